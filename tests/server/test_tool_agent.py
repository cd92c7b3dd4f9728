"""An agent loop on a real chat model (Qwen2.5-Coder-0.5B-Instruct, Hermes-style tool template) through the
official openai client: tool_choice auto with the hermes parser, the model calls a tool, the result goes back
as a `tool` message, the model answers; several turns, streamed and not. Skipped without the model
(`../shared/tools/get_qwen_coder.sh /work/models 0.5b` builds it; PAGEDLLM_QWEN_CODER_DIR points elsewhere)."""
import json
import os

import openai
import pytest
from server.server_utils import API_KEY, MODEL_NAME, start_server, stop_server, wait_healthy

from pagedllm.chat_template import render_chat

QWEN_DIR = os.environ.get("PAGEDLLM_QWEN_CODER_DIR", "/work/models/qwen2.5-coder-0.5b-instruct")
pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(QWEN_DIR, "config.json")),
                                reason=f"no Qwen2.5-Coder model at {QWEN_DIR} (PAGEDLLM_QWEN_CODER_DIR)")

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "city name"}},
                   "required": ["city"]}}}]
WEATHER = {"Paris": '{"temperature_celsius": 18, "sky": "sunny"}',
           "Tokyo": '{"temperature_celsius": 25, "sky": "rain"}'}
TEMPERATURE = {"Paris": "18", "Tokyo": "25"}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    log = tmp_path_factory.mktemp("qwen") / "serve.log"
    server = start_server(QWEN_DIR, str(log), API_KEY, "--max-model-len", "4096", "--enable-auto-tool-choice",
                          "--tool-call-parser", "hermes")
    try:
        wait_healthy(server, timeout=600)
        yield openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=600)
    finally:
        stop_server(server)


def _ask(client, messages, stream: bool, **options) -> dict:
    """The assistant message of one turn, as a dict to send back (streamed deltas assembled)."""
    kw = {"model": MODEL_NAME, "messages": messages, "tools": TOOLS, "temperature": 0, "max_tokens": 60, **options}
    if not stream:
        choice = client.chat.completions.create(**kw).choices[0]
        calls = [c.model_dump(include={"id", "type", "function"}) for c in choice.message.tool_calls or []]
        return {"role": "assistant", "content": choice.message.content, "tool_calls": calls,
                "finish_reason": choice.finish_reason}
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for d in choice.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": d.id, "type": "function",
                                                  "function": {"name": d.function.name, "arguments": ""}})
                call["function"]["arguments"] += d.function.arguments or ""
            finish = choice.finish_reason or finish
    return {"role": "assistant", "content": content or None, "tool_calls": list(calls.values()),
            "finish_reason": finish}


def _turn(client, messages, question: str, city: str, stream: bool):
    """The user asks, the model calls get_weather(city), gets the result, answers with it. The answer is asked
    with tool_choice "none" (tools still in the template): given "auto" after a tool result, this 0.5B model
    (Q4_K_M, dequantized) only repeats its call, as transformers' generate does on the same prompt."""
    messages.append({"role": "user", "content": question})
    answer = _ask(client, messages, stream)
    assert answer.pop("finish_reason") == "tool_calls", answer
    [call] = answer["tool_calls"]
    assert call["function"]["name"] == "get_weather" and call["id"].startswith("call_")
    assert json.loads(call["function"]["arguments"]) == {"city": city}
    messages.append(answer)
    messages.append({"role": "tool", "tool_call_id": call["id"], "content": WEATHER[city]})
    final = _ask(client, messages, stream, tool_choice="none")
    assert final.pop("finish_reason") in ("stop", "length") and not final["tool_calls"], final
    assert TEMPERATURE[city] in final["content"], final   # it read the tool's answer
    messages.append({"role": "assistant", "content": final["content"]})


def test_agent_loop_calls_a_tool_and_answers_with_its_result(client):
    messages = [{"role": "system", "content": "You are a helpful assistant. Use the tools to answer."}]
    _turn(client, messages, "What is the weather in Paris right now?", "Paris", stream=False)
    _turn(client, messages, "And what is the weather in Tokyo?", "Tokyo", stream=True)
    # The whole conversation (calls, tool results, answers) went back through the model's own template.
    from transformers import AutoTokenizer
    text = render_chat(AutoTokenizer.from_pretrained(QWEN_DIR), messages, tools=TOOLS)
    assert text.count('<tool_call>\n{"name": "get_weather"') == 2 and text.count("<tool_response>") == 2
    assert '"city": "Tokyo"' in text and WEATHER["Tokyo"] in text
