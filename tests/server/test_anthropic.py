"""Anthropic's Messages API (/v1/messages, as vLLM 0.26 serves it) through the official anthropic client: the answer
is the chat completion of the same conversation, streamed events join to the same message, a forced tool call
comes back as a tool_use block and a tool_result goes back to the template; errors in Anthropic's shape."""
import json

import httpx
import jsonschema
import pytest
from server.server_utils import API_KEY, EDGE_MAX_BODY, EDGE_ROOT_PATH, MODEL_NAME

anthropic = pytest.importorskip("anthropic")

WEATHER = {"name": "get_weather", "description": "Current weather of a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                             "days": {"type": "integer", "minimum": 1,
                                                                      "maximum": 7}},
                            "required": ["city", "days"], "additionalProperties": False}}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
STORY = [{"role": "user", "content": "Tell me a story"}]   # the tiny model's greedy answer: 24 tokens of text
GREEDY = {"temperature": 0}   # vLLM's field: Anthropic's SDK takes it in extra_body only


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key=API_KEY, max_retries=0, timeout=120)   # x-api-key


def _chat(server, **kw) -> dict:
    body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 24, "temperature": 0, **kw}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, headers=server.headers, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_message_is_the_chat_completion_and_streams_to_the_same(client, server):
    system = "You tell stories."
    chat = _chat(server, messages=[{"role": "system", "content": system}, *STORY])
    assert chat["choices"][0]["message"]["content"]
    kw = dict(model=MODEL_NAME, system=system, messages=STORY, max_tokens=24, extra_body=GREEDY)
    message = client.messages.create(**kw)
    assert message.type == "message" and message.role == "assistant" and message.model == MODEL_NAME
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == chat["choices"][0]["message"]["content"]
    assert message.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[chat["choices"][0]["finish_reason"]]
    assert (message.usage.input_tokens, message.usage.output_tokens) == \
        (chat["usage"]["prompt_tokens"], chat["usage"]["completion_tokens"])
    with client.messages.stream(**kw) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == message.content[0].text
    assert [(b.type, b.text) for b in final.content] == [(b.type, b.text) for b in message.content]
    assert final.stop_reason == message.stop_reason
    assert final.usage.input_tokens == message.usage.input_tokens
    assert final.usage.output_tokens == message.usage.output_tokens
    # the raw events, in Anthropic's order, with no [DONE]
    body = {**{k: v for k, v in kw.items() if k != "extra_body"}, **GREEDY, "stream": True}
    r = httpx.post(server.url + "/v1/messages", json=body, headers={"x-api-key": API_KEY}, timeout=120)
    names = [line[7:] for line in r.text.splitlines() if line.startswith("event: ")]
    assert names[:2] == ["message_start", "content_block_start"] and names[-3:] == \
        ["content_block_stop", "message_delta", "message_stop"] and "[DONE]" not in r.text


def test_a_forced_tool_call_cut_by_max_tokens_keeps_its_partial_arguments(client, server):
    """max_tokens ends the forced call mid-JSON: stop_reason max_tokens, the partial text under "arguments" (it
    was a 400 from json.loads), streamed or not."""
    kw = dict(model=MODEL_NAME, messages=MESSAGES, max_tokens=6, extra_body=GREEDY, tools=[WEATHER],
              tool_choice={"type": "tool", "name": "get_weather"})
    message = client.messages.create(**kw)
    [call] = [b for b in message.content if b.type == "tool_use"]
    assert message.stop_reason == "max_tokens" and isinstance(call.input["arguments"], str), message
    assert call.input["arguments"].startswith("{")


def test_arguments_nested_past_the_decoders_depth_are_kept_as_text():
    """A model looping on brackets in a call's arguments: json.loads' RecursionError was a 500."""
    from pagedllm.server.anthropic import _input
    deep = '{"a": ' + "[" * 5000 + "]" * 5000 + "}"
    assert _input(deep) == {"arguments": deep}


def test_stop_sequence_is_named(client, server):
    kw = dict(model=MODEL_NAME, system="You tell stories.", messages=STORY, max_tokens=24, extra_body=GREEDY)
    text = client.messages.create(**kw).content[0].text
    stop = text[4:7]
    message = client.messages.create(**kw, stop_sequences=["zzz", stop])
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == stop
    assert message.content[0].text == text[:text.index(stop)]


def test_forced_tool_use_and_its_result(client, server):
    """tool_choice {"type": "tool"} forces the call (structured output); its input follows the schema; the
    stream's input_json_delta pieces join to it; the tool_use and tool_result go back as the chat's tool call
    and tool message (the same prompt as the chat request's)."""
    kw = dict(model=MODEL_NAME, messages=MESSAGES, max_tokens=80, extra_body=GREEDY, tools=[WEATHER],
              tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True})
    message = client.messages.create(**kw)
    [call] = [b for b in message.content if b.type == "tool_use"]
    assert call.name == "get_weather" and message.stop_reason == "tool_use"
    jsonschema.validate(call.input, WEATHER["input_schema"])
    with client.messages.stream(**kw) as stream:
        final = stream.get_final_message()
    assert [b for b in final.content if b.type == "tool_use"][0].input == call.input

    history = [*MESSAGES, {"role": "assistant", "content": [{"type": "text", "text": "Let me look."},
                                                          {"type": "tool_use", "id": call.id, "name": call.name,
                                                           "input": call.input}]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                             "content": [{"type": "text", "text": "sunny"}]},
                                            {"type": "text", "text": "And tomorrow?"}]}]
    counted = client.messages.count_tokens(model=MODEL_NAME, messages=history, tools=[WEATHER])
    chat_history = [*MESSAGES, {"role": "assistant", "content": "Let me look.", "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": json.dumps(call.input)}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"}, {"role": "user", "content": "And tomorrow?"}]
    r = httpx.post(server.url + "/tokenize", headers=server.headers, timeout=60, json={
        "model": MODEL_NAME, "messages": chat_history,
        "tools": [{"type": "function", "function": {"name": WEATHER["name"], "description": WEATHER["description"],
                                                    "parameters": WEATHER["input_schema"]}}]})
    assert counted.input_tokens == r.json()["count"]
    answer = client.messages.create(model=MODEL_NAME, messages=history, max_tokens=8, extra_body=GREEDY,
                                    tools=[WEATHER], tool_choice={"type": "none"})
    assert [b.type for b in answer.content] == ["text"]


@pytest.mark.parametrize("body,param", [
    ({"messages": MESSAGES}, "max_tokens"),                                           # required
    ({"messages": MESSAGES, "max_tokens": 8, "colour": "red"}, "colour"),             # unknown
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "x"}}]}],
      "max_tokens": 8}, "messages.0.content.0"),
    ({"messages": MESSAGES, "max_tokens": 8, "thinking": {"type": "enabled", "budget_tokens": 64}}, "thinking"),
    ({"messages": MESSAGES, "max_tokens": 8, "tool_choice": {"type": "tool"}}, "tool_choice.name"),
    # another type's field (accepted and dropped before)
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "is_error": True}]}],
      "max_tokens": 8}, "messages.0.content.0: a content block of type text does not take is_error"),
    ({"messages": MESSAGES, "max_tokens": 8, "tool_choice": {"type": "auto", "name": "add"}},
     "tool_choice: a tool_choice of type auto does not take name"),
    # a schema the grammar compiler refuses is named as the Anthropic field (it was chat's
    # tools.0.function.parameters)
    ({"messages": MESSAGES, "max_tokens": 8, "tool_choice": {"type": "any"}, "tools": [
        {"name": "f", "input_schema": {"type": "object", "properties": {"a": {"type": "string", "pattern": "(("}}}}]},
     "tools.0.input_schema: "),
])
def test_errors_are_anthropic_shaped_and_name_the_field(server, body, param):
    r = httpx.post(server.url + "/v1/messages", json={"model": MODEL_NAME, **body}, headers={"x-api-key": API_KEY},
                   timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()
    assert set(error) == {"type", "error"} and error["type"] == "error", error
    assert error["error"]["type"] == "invalid_request_error" and param in error["error"]["message"], error


def test_api_key_and_model_errors(client, server):
    r = httpx.post(server.url + "/v1/messages", json={"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 4},
                   headers={"x-api-key": "wrong"}, timeout=60)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", r.text
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="claude-nonexistent", messages=MESSAGES, max_tokens=4)
    assert httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL_NAME, "messages": MESSAGES,
                                                                 "max_tokens": 2},
                      headers={"x-api-key": API_KEY}, timeout=60).status_code == 200   # either header, any route


def test_a_chat_fields_error_names_the_anthropic_field(server):
    body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 8, "stop_sequences": [""]}
    r = httpx.post(server.url + "/v1/messages", json=body, headers={"x-api-key": API_KEY}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("stop_sequences: "), r.text
    prefill = {"model": MODEL_NAME, "max_tokens": 8, "temperature": 0,
               "messages": [*STORY, {"role": "assistant", "content": "Once"}]}
    r = httpx.post(server.url + "/v1/messages/count_tokens", json={k: prefill[k] for k in ("model", "messages")},
                   headers={"x-api-key": API_KEY}, timeout=60)
    chat = httpx.post(server.url + "/tokenize", headers=server.headers, timeout=60, json={
        "model": MODEL_NAME, "messages": prefill["messages"], "add_generation_prompt": False,
        "continue_final_message": True}).json()
    # the prefill is continued: no generation prompt; vLLM 0.26's context_management says the same count
    assert r.json() == {"input_tokens": chat["count"], "context_management": {"original_input_tokens": chat["count"]}}


def test_errors_at_the_edge_are_anthropic_shaped_too(servers):
    """Errors raised before the route runs (the body guard's 413 and lone-surrogate 400) keep Anthropic's shape on
    its routes."""
    edge = servers["edge"]
    url = edge.url + EDGE_ROOT_PATH + "/v1/messages"
    big = {"model": MODEL_NAME, "max_tokens": 4, "messages": [{"role": "user", "content": "a" * EDGE_MAX_BODY}]}
    r = httpx.post(url, json=big, headers=edge.headers, verify=edge.verify, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large", r.text
    body = b'{"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "\\ud800"}]}'
    r = httpx.post(url, content=body, headers={**edge.headers, "content-type": "application/json"},
                   verify=edge.verify, timeout=60)
    assert r.status_code == 400 and set(r.json()) == {"type", "error"}, r.text
    assert "messages.0.content" in r.json()["error"]["message"]
