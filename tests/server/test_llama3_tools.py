"""A Llama 3.1 Instruct set-up through a real server: `--enable-auto-tool-choice --tool-call-parser llama3_json`
on a tiny random model with the Llama 3.1 tokenizer and its own chat template (tools in the first user
message). The model's answer is forced with a regex (structured output under tool_choice auto), so the call it
writes is known; its tokens, and so the streamed deltas, are whatever the random model picks."""
import json
import re
import shutil
from pathlib import Path

import httpx
import pytest
from server.server_utils import API_KEY, MODEL_NAME, start_server, stop_server, wait_healthy

LLAMA3 = Path("/work/shared/model-configs/meta-llama--Llama-3.1-8B-Instruct")
pytestmark = pytest.mark.skipif(not LLAMA3.is_dir(), reason="Llama-3.1 tokenizer files absent")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
ANSWER = '{"name": "get_weather", "parameters": {"city": "Paris"}}'


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    from conftest import make_tiny_model
    root = tmp_path_factory.mktemp("llama3")
    path = Path(make_tiny_model(root / "model", vocab_size=128256, tie_word_embeddings=True, seed=7,
                                bos_token_id=128000, eos_token_id=128009))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        shutil.copy(LLAMA3 / name, path / name)
    (path / "tokenizer.model").unlink()   # the demo's sentencepiece file: not this tokenizer's
    server = start_server(str(path), str(root / "serve.log"), API_KEY, "--enable-auto-tool-choice",
                          "--tool-call-parser", "llama3_json", "--structured-outputs-compile-timeout", "120")
    try:
        wait_healthy(server)
        yield server
    finally:
        stop_server(server)


def _chat(server, answer: str, stream: bool = False, **kw) -> httpx.Response:
    body = {"model": MODEL_NAME, "messages": MESSAGES, "tools": [WEATHER], "max_tokens": 60, "temperature": 0,
            "stream": stream, "structured_outputs": {"regex": re.escape(answer)}, **kw}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, headers=server.headers, timeout=120)
    assert r.status_code == 200, r.text
    return r


def _streamed(server, answer: str) -> tuple[str, list[list[str]], str | None]:
    """(content, [[id, name, arguments] of each call], finish_reason) joined from the chunks; each call's
    first delta carries id, type, name and arguments "", the later ones only arguments."""
    content, calls, finish = "", [], None
    for line in _chat(server, answer, stream=True).text.splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        for choice in json.loads(line[6:])["choices"]:
            content += choice["delta"].get("content") or ""
            for d in choice["delta"].get("tool_calls") or []:
                if d["index"] == len(calls):
                    assert d["type"] == "function" and d["function"]["arguments"] == "", d
                    calls.append([d["id"], d["function"]["name"], ""])
                else:
                    assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}, d
                    calls[d["index"]][2] += d["function"]["arguments"]
            finish = choice["finish_reason"] or finish
    return content, calls, finish


@pytest.mark.parametrize("answer,calls", [
    (ANSWER, [("get_weather", '{"city": "Paris"}')]),
    (ANSWER + "; " + ANSWER.replace("Paris", "Oslo"), [("get_weather", '{"city": "Paris"}'),
                                                       ("get_weather", '{"city": "Oslo"}')]),
])
def test_calls_streamed_and_not(llama3, answer, calls):
    choice = _chat(llama3, answer).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None, choice
    got = choice["message"]["tool_calls"]
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in got] == calls
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in got)
    content, streamed, finish = _streamed(llama3, answer)
    assert (content, finish) == ("", "tool_calls")
    assert [(name, arguments) for _, name, arguments in streamed] == calls


def test_text_is_content(llama3):
    answer = "It is sunny in Paris."
    choice = _chat(llama3, answer).json()["choices"][0]
    assert choice["message"]["content"] == answer and "tool_calls" not in choice["message"]   # vLLM's: no empty list
    assert choice["finish_reason"] == "stop"
    assert _streamed(llama3, answer) == (answer, [], "stop")


def test_the_template_renders_tools_and_a_call_sent_back(llama3):
    """Llama 3.1's template: the tools in the first user message, an assistant's call as its JSON (arguments
    given as a string, rendered as the object), a tool's answer as an ipython turn."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    r = httpx.post(llama3.url + "/tokenize", json={"model": MODEL_NAME, "messages": messages, "tools": [WEATHER],
                                                   "return_token_strs": True}, headers=llama3.headers, timeout=60)
    assert r.status_code == 200, r.text
    from transformers import AutoTokenizer
    prompt = AutoTokenizer.from_pretrained(str(LLAMA3)).decode(r.json()["tokens"])
    assert "Environment: ipython" in prompt and '"name": "get_weather"' in prompt
    assert ("<|start_header_id|>assistant<|end_header_id|>\n\n" + ANSWER + "<|eot_id|>"
            "<|start_header_id|>ipython<|end_header_id|>\n\n\"sunny\"<|eot_id|>") in prompt
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    choice = _chat(llama3, "It is sunny.", messages=messages).json()["choices"][0]
    assert choice["message"]["content"] == "It is sunny."
