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


def _nested_one_of(depth: int, maximum: int) -> dict:
    """Nested oneOf (as vLLM #54003's): at depth 4 it takes ~0.3 s to compile for a 512-token vocabulary."""
    if depth == 0:
        return {"type": "string", "pattern": "^[a-z]{1,20}$"}
    inner = _nested_one_of(depth - 1, maximum)
    return {"oneOf": [{"type": "object", "properties": {f"k{i}": inner for i in range(3)}, "required": ["k0"]},
                      {"type": "array", "items": inner, "minItems": 2, "maxItems": 9},
                      {"type": "integer", "minimum": -1000, "maximum": maximum}]}


SLOW_SCHEMAS = [_nested_one_of(4, 1000 + i) for i in range(2)]   # two: neither is served from the other's cache
MESSAGES = [{"role": "user", "content": "Pick a colour."}]
LARK = 'start: WORD ("," WORD)~0..2 "."\nWORD: /[a-z]{1,4}/'
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
    ({"structured_outputs": {"grammar": LARK}}, {"grammar": LARK}),   # Lark: converted to EBNF
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
    ({"extra_body": {"guided_grammar": "%import common.WS\nstart: WS"}}, "guided_grammar"),   # Lark, not converted
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


def test_min_tokens_past_the_constraints_end_is_a_400_naming_both(client, server):
    """A choice ends after a token or two, min_tokens forbids the end before 8: no token is left to sample."""
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(messages=MESSAGES, extra_body={"guided_choice": ["a", "b"], "min_tokens": 8},
                                       **KW)
    assert e.value.body["param"] == "guided_choice" and "min_tokens" in e.value.body["message"], e.value.body
    # streamed, found after the first tokens went out: the stream's error event says as much
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers=server.headers, timeout=60, json={
            "messages": MESSAGES, "stream": True, "guided_choice": ["a", "b"], "min_tokens": 8, **KW}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    error = json.loads(events[-2])["error"]
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "guided_choice",
                                                              "invalid_structured_output") and "min_tokens" in \
        error["message"], error
    wait_all_blocks_free(server)


def test_top_logprobs_past_what_the_constraint_allows_are_finite_json(client, server):
    """A choice allows one or two tokens a step: the rest of the top-5 are tokens the grammar masked (-inf).
    They come as vLLM's -9999.0, on both endpoints, streamed or not: JSON has no -Infinity (it was a 400 "Out of
    range float values are not JSON compliant" non-streamed, and a stream's chunks were not JSON)."""
    extra = {"guided_choice": ["yes", "no"]}
    out = client.chat.completions.create(messages=MESSAGES, extra_body=extra, logprobs=True, top_logprobs=5,
                                         seed=0, **KW)
    assert out.choices[0].message.content in ("yes", "no")
    tops = [t.logprob for entry in out.choices[0].logprobs.content for t in entry.top_logprobs]
    assert -9999.0 in tops and all(lp >= -9999.0 for lp in tops)
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers=server.headers, timeout=60, json={
            "messages": MESSAGES, "logprobs": True, "top_logprobs": 5, "stream": True, "seed": 0, **extra,
            **KW}) as r:
        body = r.read().decode()
    assert r.status_code == 200 and "Infinity" not in body and "-9999.0" in body
    done = client.completions.create(prompt="Pick", extra_body=extra, logprobs=5, seed=0, **KW)
    assert done.choices[0].text in ("yes", "no")
    assert min(min(top.values()) for top in done.choices[0].logprobs.top_logprobs) == -9999.0
    wait_all_blocks_free(server)


@pytest.mark.parametrize("extra, param", [({"guided_regex": "[^\\s\\S]"}, "guided_regex"),
                                          ({"structured_outputs": {"regex": "a[^\\s\\S]"}}, "structured_outputs")])
def test_a_constraint_that_matches_no_text_is_a_400_naming_it(client, server, extra, param):
    """Its language is empty (at once, or after an `a`): no token may be sampled, which is the request's fault.
    Streamed, the failure comes before any output only for the first: the other's stream has begun."""
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(messages=MESSAGES, extra_body=extra, **KW)
    assert e.value.body["param"] == param and "matches no text" in e.value.body["message"], e.value.body
    if "guided_regex" in extra:
        with pytest.raises(openai.BadRequestError) as e:
            list(client.chat.completions.create(messages=MESSAGES, extra_body=extra, stream=True, **KW))
        assert e.value.body["param"] == param, e.value.body
    wait_all_blocks_free(server)


def test_a_compile_past_its_time_limit_is_a_400_while_other_requests_stream(tiny_model_dirs, tmp_path):
    """A 50 ms compile limit and schemas that take ~0.3 s to compile: the engine fails them, each comes back as a
    400 naming the field sent (streamed: before the status line), and a plain stream sent with them runs to the
    end. The limit counts from the compile's start (not the engine's one-time grammar set-up)."""
    server = start_server(tiny_model_dirs["llama"], str(tmp_path / "serve.log"), None,
                          "--structured-outputs-compile-timeout", "0.05")
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
            streamed = pool.submit(constrained, True, {"guided_json": SLOW_SCHEMAS[0]})
            streamed.result(timeout=60)
            full = pool.submit(constrained, False, {"structured_outputs": {"json": SLOW_SCHEMAS[1]}})
            for future, param in ((streamed, "guided_json"), (full, "structured_outputs")):
                e = future.result(timeout=60)
                assert isinstance(e, openai.BadRequestError), e
                assert e.body["param"] == param and e.body["code"] == "invalid_structured_output", e.body
                assert "compile" in e.body["message"], e.body
            assert len(free.result(timeout=60)) > 0
    finally:
        stop_server(server)
