"""Tool calling through the official openai client: tool_choice required and a named function (enforced by
structured output, so any model calls them: here a tiny random one), auto (parsed from free text), streamed
and not; the 400s of bad combinations. The agent loop on a real chat model is test_tool_agent.py."""
import json

import jsonschema
import openai
import pytest
from server.server_utils import MODEL_NAME

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
NOW = {"type": "function", "function": {"name": "now", "description": "The time"}}   # no parameters (#28806)
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
SCHEMAS = {"get_weather": WEATHER["function"]["parameters"], "now": {"type": "object", "maxProperties": 0}}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def plain_client(servers):
    """A server without --enable-auto-tool-choice."""
    small = servers["small"]
    return openai.OpenAI(base_url=small.url + "/v1", api_key=small.api_key, max_retries=0, timeout=60)


def _create(client, **kw):
    return client.chat.completions.create(**{"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 80,
                                             "temperature": 0, **kw})


def _check_calls(calls, names=None, cut_short=False):
    """Each call: an id, a known name, arguments that parse and follow the tool's parameters (but the last when
    the output was cut short by max_tokens)."""
    assert calls
    for call in calls[:-1] if cut_short else calls:
        assert call.id.startswith("call_") and call.type == "function"
        assert names is None or call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def _streamed(client, **kw):
    """(content, {index: (id, name, arguments)}, finish_reason) of a streamed answer, checking each call's
    first delta carries id, type, name and arguments "" (never None: vLLM #9693)."""
    content, calls, finish = "", {}, None
    for chunk in _create(client, stream=True, **kw):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for d in choice.delta.tool_calls or []:
                if d.index not in calls:
                    assert d.id and d.type == "function" and d.function.name
                    assert isinstance(d.function.arguments, str)
                    calls[d.index] = [d.id, d.function.name, ""]
                else:
                    assert d.id is None and d.function.name is None
                calls[d.index][2] += d.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, calls, finish


@pytest.mark.parametrize("tool", [WEATHER, NOW])
def test_named_function_is_called_with_valid_arguments(client, tool):
    name = tool["function"]["name"]
    choice = {"type": "function", "function": {"name": name}}
    out = _create(client, tools=[WEATHER, NOW], tool_choice=choice)
    message = out.choices[0].message
    # "stop", not "tool_calls": the call was the request's, as OpenAI and vLLM answer a named function; content
    # "" (vLLM's `content or ""` for a forced call; it was null)
    assert out.choices[0].finish_reason == "stop" and message.content == ""
    _check_calls(message.tool_calls, [name])
    assert len(message.tool_calls) == 1
    content, calls, finish = _streamed(client, tools=[WEATHER, NOW], tool_choice=choice)
    assert (content, finish) == ("", "stop")
    assert [(n, a) for _, n, a in calls.values()] == [(name, message.tool_calls[0].function.arguments)]


@pytest.mark.parametrize("parallel", [None, False])
def test_required_makes_calls_streamed_as_not(client, parallel):
    kw = {"tools": [WEATHER, NOW], "tool_choice": "required", "max_tokens": 160,
          **({} if parallel is None else {"parallel_tool_calls": parallel})}
    out = _create(client, **kw)
    message, finish_reason = out.choices[0].message, out.choices[0].finish_reason
    # Any number of calls: the random model may go on adding calls until max_tokens.
    assert finish_reason == "tool_calls" or (parallel is None and finish_reason == "length")
    assert message.content == ""
    _check_calls(message.tool_calls, ["get_weather", "now"], cut_short=finish_reason == "length")
    if parallel is False:
        assert len(message.tool_calls) == 1
    content, calls, finish = _streamed(client, **kw)
    assert (content, finish) == ("", finish_reason)
    assert [(n, a) for _, n, a in calls.values()] == [(c.function.name, c.function.arguments)
                                                      for c in message.tool_calls]


def test_required_cut_short_before_a_name_says_nothing(client):
    """max_tokens ends the output inside the constraint's JSON before a call's name: no call, and the JSON is not
    content either (it was a content of '[{"name"'), streamed or not: content "", as vLLM 0.26 answers."""
    kw = {"tools": [WEATHER, NOW], "tool_choice": "required", "max_tokens": 3}
    out = _create(client, **kw).choices[0]
    assert out.finish_reason == "length" and out.message.content == "" and not out.message.tool_calls
    assert _streamed(client, **kw) == ("", {}, "length")


def test_auto_on_text_without_calls_is_plain_content(client):
    """The tiny model writes no <tool_call>: its text is the content, as without tools."""
    plain = _create(client).choices[0]
    out = _create(client, tools=[WEATHER]).choices[0]
    assert out.message.content == plain.message.content and not out.message.tool_calls
    assert out.finish_reason == plain.finish_reason != "tool_calls"
    content, calls, finish = _streamed(client, tools=[WEATHER])
    assert (content, calls, finish) == (plain.message.content, {}, plain.finish_reason)


def test_none_passes_tools_but_parses_nothing(client):
    plain = _create(client).choices[0]
    out = _create(client, tools=[WEATHER], tool_choice="none").choices[0]
    assert out.message.content == plain.message.content and not out.message.tool_calls


@pytest.mark.parametrize("kw,param", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools.0.function.parameters"),
    ({"tools": [WEATHER, WEATHER]}, "tools.1.function.name"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, None),
])
def test_bad_tool_requests_are_400_naming_the_field(client, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        _create(client, **kw)
    assert param is None or e.value.body["param"] == param, e.value.body


def test_auto_needs_the_server_flags(plain_client):
    for kw in ({"tools": [WEATHER]}, {"tools": [WEATHER], "tool_choice": "auto"}):
        with pytest.raises(openai.BadRequestError) as e:
            _create(plain_client, **kw)
        assert e.value.body["param"] == "tool_choice" and "--enable-auto-tool-choice" in e.value.body["message"]


def test_allowed_tools_shows_only_the_tools_it_names(client):
    """tool_choice allowed_tools (OpenAI's; it was a 400): the model is shown only the tools it names and its mode
    chooses among them: the prompt and call of the same request with only those tools."""
    clock = {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}}, "required": ["zone"]}}}
    allowed = {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
        {"type": "function", "function": {"name": "get_time"}}]}}
    got = _create(client, tools=[WEATHER, clock], tool_choice=allowed, parallel_tool_calls=False)
    alone = _create(client, tools=[clock], tool_choice="required", parallel_tool_calls=False)
    assert got.usage.prompt_tokens == alone.usage.prompt_tokens
    [call], [same] = got.choices[0].message.tool_calls, alone.choices[0].message.tool_calls
    assert call.function.name == same.function.name == "get_time" and call.function.arguments == same.function.arguments
