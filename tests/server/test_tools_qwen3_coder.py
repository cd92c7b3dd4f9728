"""`--tool-call-parser qwen3_coder` through the openai client: the tiny random model is made to write a
Qwen3-Coder call (the request's own structured output, a choice of one text), streamed and not. The call's
values take the types of the tool's schema, the stream's fragments join to the non-streamed arguments, and
finish_reason is "tool_calls"; a call cut off by max_tokens keeps "length" and what was written."""
import json

import openai
import pytest
from server.server_utils import API_KEY, CHAT_TEMPLATE, MODEL_NAME, serving, start_server

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city", "days"]}}}
CALL = ("Checking.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nNew York\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>")


@pytest.fixture(scope="module")
def client(tiny_model_dirs, tmp_path_factory):
    logs = tmp_path_factory.mktemp("qwen3_coder_serve")
    template = logs / "template.jinja"
    template.write_text(CHAT_TEMPLATE)
    server = start_server(tiny_model_dirs["llama"], str(logs / "server.log"), API_KEY, "--chat-template",
                          str(template), "--enable-auto-tool-choice", "--tool-call-parser", "qwen3_coder")
    with serving({"qwen3_coder": server}):
        yield openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _create(client, text: str, **kw):
    return client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Weather in New York?"}],
        **{"tools": [WEATHER], "temperature": 0, "max_tokens": 200,
           "extra_body": {"structured_outputs": {"choice": [text]}}, **kw})


def _streamed(client, text: str, **kw):
    """(content, [(id, name, arguments)], finish_reason): each call's first delta has its id and name."""
    content, calls, finish = "", {}, None
    for chunk in _create(client, text, stream=True, **kw):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for d in choice.delta.tool_calls or []:
                if d.index not in calls:
                    assert d.id and d.type == "function" and d.function.name and d.function.arguments == ""
                    calls[d.index] = [d.id, d.function.name, ""]
                else:
                    assert d.id is None and d.function.name is None
                calls[d.index][2] += d.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, [tuple(c) for c in calls.values()], finish


def test_a_call_streamed_and_not(client):
    out = _create(client, CALL).choices[0]
    assert out.finish_reason == "tool_calls" and out.message.content == "Checking."
    (call,) = out.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert call.function.arguments == '{"city": "New York", "days": 3}'   # days: an integer, by the schema
    content, calls, finish = _streamed(client, CALL)
    assert (content, finish) == ("Checking.", "tool_calls")
    assert [(n, a) for _, n, a in calls] == [("get_weather", call.function.arguments)]


def test_a_call_cut_off_by_max_tokens_keeps_what_was_written(client):
    """max_tokens ends the text inside the city's value: "length", and the call with the value so far (vLLM's
    non-streamed answer), streamed as not."""
    out = _create(client, CALL, max_tokens=60).choices[0]
    assert out.finish_reason == "length" and out.message.content == "Checking."
    (call,) = out.message.tool_calls
    args = json.loads(call.function.arguments)
    assert call.function.name == "get_weather" and list(args) == ["city"]
    assert args["city"] and "New York".startswith(args["city"]) and args["city"] != "New York"
    content, calls, finish = _streamed(client, CALL, max_tokens=60)
    assert (content, finish) == ("Checking.", "length")
    assert [(n, a) for _, n, a in calls] == [("get_weather", call.function.arguments)]
