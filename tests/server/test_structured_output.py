"""Structured output through the server and the official `openai` client: each field (response_format,
extra_body structured_outputs and guided_*) gives the offline answer under the same constraint, streamed or not;
a bad constraint or two at once is a 400 naming the field, streamed or not, and the server runs on."""
import json

import httpx
import jsonschema
import openai
import pytest
from server.server_utils import MODEL_NAME, wait_all_blocks_free

from pagedllm import SamplingParams

SCHEMA = {"type": "object", "properties": {"colour": {"enum": ["red", "green"]}, "n": {
    "type": "integer", "minimum": 0, "maximum": 9}}, "required": ["colour", "n"]}
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
