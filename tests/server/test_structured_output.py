"""Structured output through the server and the official `openai` client: each field (response_format,
extra_body structured_outputs and guided_*) gives the offline answer under the same constraint, streamed or not;
a bad constraint or two at once is a 400 naming the field, streamed or not, and the server runs on."""
import json
import time

import httpx
import jsonschema
import openai
import pytest
from concurrent.futures import ThreadPoolExecutor

from server.server_utils import MODEL_NAME, start_server, stop_server, wait_all_blocks_free, wait_healthy

from pagedllm import SamplingParams

SCHEMA = {"type": "object", "properties": {"colour": {"enum": ["red", "green"]}, "n": {
    "type": "integer", "minimum": 0, "maximum": 9}}, "required": ["colour", "n"]}
SLOW_SCHEMA = {"type": "object", "properties": {f"p{i}": {"type": "string", "maxLength": i + 1} for i in range(60)},
               "required": [f"p{i}" for i in range(60)]}   # ~25 ms to compile for a 512-token vocabulary
MESSAGES = [{"role": "user", "content": "Pick a colour."}]
KW = dict(model=MODEL_NAME, max_tokens=64, temperature=1.0)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0)


def offline(llm, prompt_or_ids, seed: int, **constraint) -> list:
    params = SamplingParams(max_tokens=64, temperature=1.0, seed=seed, n=2, structured_outputs=constraint)
    return [c.text for c in llm.generate(prompt_or_ids, params, use_tqdm=False)[0].outputs]


def chat_prompt_ids(server) -> list[int]:
    r = httpx.post(server.url + "/tokenize", json={"messages": MESSAGES}, headers=server.headers)
    return r.json()["tokens"]


def test_chat_response_format_json_schema_and_json_object(client, server, offline_llm):
    ids = chat_prompt_ids(server)
    rf = {"type": "json_schema", "json_schema": {"name": "pick", "schema": SCHEMA, "strict": True}}
    out = client.chat.completions.create(messages=MESSAGES, response_format=rf, seed=3, n=2, **KW)
    assert [c.message.content for c in out.choices] == offline(offline_llm, ids, 3, json=SCHEMA)
    for c in out.choices:
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.message.content), SCHEMA)
    out = client.chat.completions.create(messages=MESSAGES, response_format={"type": "json_object"}, seed=4, n=2,
                                         **KW)
    assert [c.message.content for c in out.choices] == offline(offline_llm, ids, 4, json_object=True)


@pytest.mark.parametrize("extra, constraint", [
    ({"structured_outputs": {"regex": "[a-c]{2,5}"}}, {"regex": "[a-c]{2,5}"}),
    ({"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}},
     {"json": SCHEMA, "disable_any_whitespace": True}),
    ({"guided_json": SCHEMA, "guided_decoding_backend": "xgrammar"}, {"json": SCHEMA}),
    ({"guided_regex": "(yes|no)!"}, {"regex": "(yes|no)!"}),
    ({"guided_choice": ['say "hi"', "日本"]}, {"choice": ['say "hi"', "日本"]}),
    ({"guided_grammar": 'root ::= ("a" | "b") "."'}, {"grammar": 'root ::= ("a" | "b") "."'}),
])
def test_completions_extra_body_fields_streamed_or_not(client, offline_llm, extra, constraint):
    expected = offline(offline_llm, "Once upon a time", 5, **constraint)
    full = client.completions.create(prompt="Once upon a time", seed=5, n=2, extra_body=extra, **KW)
    assert [c.text for c in full.choices] == expected
    texts = {}
    for chunk in client.completions.create(prompt="Once upon a time", seed=5, n=2, stream=True, extra_body=extra,
                                           **KW):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert [texts[0], texts[1]] == expected


def test_chat_streamed_choice(client, server, offline_llm):
    choices = ["positive", "negative", "two\nlines"]
    text = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        messages=MESSAGES, seed=6, stream=True, extra_body={"guided_choice": choices}, **KW) if chunk.choices)
    assert text in choices
    assert text == offline(offline_llm, chat_prompt_ids(server), 6, choice=choices)[0]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objec"}}}},
     "response_format"),
    ({"extra_body": {"structured_outputs": {"regex": "(("}}}, "structured_outputs"),
    ({"extra_body": {"guided_json": {"type": "string", "pattern": "[a-"}}}, "guided_json"),
    ({"extra_body": {"guided_grammar": "root ::= missing"}}, "guided_grammar"),
    ({"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a"}}, "response_format"),
    ({"extra_body": {"guided_decoding_backend": "outlines", "guided_regex": "a"}}, "guided_decoding_backend"),
])
def test_bad_constraints_are_400_naming_the_field(client, server, body, param, stream):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(messages=MESSAGES, stream=stream, **KW, **body)
    assert e.value.status_code == 400 and e.value.body["param"] == param, e.value.body
    wait_all_blocks_free(server)
    ok = client.chat.completions.create(messages=MESSAGES, extra_body={"guided_choice": ["a", "b"]}, **KW)
    assert ok.choices[0].message.content in ("a", "b")


def test_a_compile_past_its_time_limit_is_a_400_while_other_requests_stream(tiny_model_dirs, tmp_path):
    """A 1 ms compile limit: the first constraint waits for the tokenizer's grammar info (well over 1 ms), and a
    60-property schema takes longer too, so the engine fails them; each comes back as a 400 naming the field sent
    (streamed: before the status line), and a plain stream sent with them runs to the end. The engine checks the
    limit at its steps (a compile done before the check is taken), so the plain stream keeps it stepping."""
    server = start_server(tiny_model_dirs["llama"], str(tmp_path / "serve.log"), None,
                          "--structured-outputs-compile-timeout", "0.001")
    try:
        wait_healthy(server)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)

        def constrained(stream: bool, extra: dict):
            try:
                out = client.completions.create(prompt="Once", stream=stream, extra_body=extra, **KW)
                return list(out) if stream else out
            except openai.BadRequestError as e:
                return e

        def plain():
            return "".join(c.choices[0].text for c in client.completions.create(
                prompt="Once upon a time", stream=True, extra_body={"ignore_eos": True},
                **{**KW, "temperature": 0.0, "max_tokens": 400}))

        with ThreadPoolExecutor(3) as pool:
            free = pool.submit(plain)
            time.sleep(0.05)
            streamed = pool.submit(constrained, True, {"guided_regex": "[a-z]{1,3}"})
            streamed.result(timeout=60)
            full = pool.submit(constrained, False, {"structured_outputs": {"json": SLOW_SCHEMA}})
            for future, param in ((streamed, "guided_regex"), (full, "structured_outputs")):
                e = future.result(timeout=60)
                assert isinstance(e, openai.BadRequestError), e
                assert e.body["param"] == param and e.body["code"] == "invalid_structured_output", e.body
                assert "compile" in e.body["message"], e.body
            assert len(free.result(timeout=60)) > 0
    finally:
        stop_server(server)
