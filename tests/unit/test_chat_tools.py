"""tools / tool_choice / parallel_tool_calls as a request becomes sampling (no server): which choice, which
constraint, which parser, which 400; the server flags."""
import pytest

from pagedllm.cli import add_config_args
from pagedllm.config import ServerConfig
from pagedllm.outputs import CompletionOutput
from pagedllm.server.chat_tools import message, plan_tools, stream_delta
from pagedllm.server.errors import APIError
from pagedllm.server.protocol import ChatCompletionRequest

TOOL = {"type": "function", "function": {"name": "f", "parameters": {
    "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}}
MESSAGES = [{"role": "user", "content": "hi"}]


def _request(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=MESSAGES, **kw)


def _plan(auto=True, **kw):
    return plan_tools(_request(**kw), "hermes" if auto else None, auto)


def test_choices_become_constraints_and_parsers():
    assert _plan(tools=[TOOL]).choice == "auto"                     # the default with tools
    assert _plan(tools=[TOOL]).structured_outputs() is None
    assert _plan().choice == "none"   # no tools: nothing to call
    with pytest.raises(APIError) as e:   # vLLM's 400 (OpenAI's too): a choice needs tools, "auto" included
        _plan(tool_choice="auto")
    assert e.value.param == "tool_choice" and "`tools` must be set" in e.value.message
    assert _plan(tools=[TOOL], tool_choice="none").parses is False
    named = _plan(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "f"}})
    assert named.structured_outputs().json == TOOL["function"]["parameters"]
    required = _plan(tools=[TOOL], tool_choice="required", parallel_tool_calls=False).structured_outputs()
    assert required.json["maxItems"] == 1 and required.json["minItems"] == 1
    assert "maxItems" not in _plan(tools=[TOOL], tool_choice="required").structured_outputs().json


def test_message_and_finish_reason():
    out = CompletionOutput(index=0, text='<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>', token_ids=[],
                           cumulative_logprob=None, logprobs=None, finish_reason="stop")
    msg, finish = message(_plan(tools=[TOOL]), out, out.text)
    assert finish == "tool_calls" and msg["content"] is None
    assert msg["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"x": 1}'}
    out.finish_reason = "length"
    assert message(_plan(tools=[TOOL]), out, out.text)[1] == "length"
    plain = message(_plan(tools=[TOOL], tool_choice="none"), out, out.text)[0]
    assert plain == {"role": "assistant", "content": out.text}


def test_a_call_forced_by_name_finishes_with_stop():
    """OpenAI and vLLM: "tool_calls" when the model chose to call (auto, required), "stop" for a function the
    request named (non-streamed and streamed alike)."""
    named = _plan(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "f"}})
    out = CompletionOutput(index=0, text='{"x": 1}', token_ids=[], cumulative_logprob=None, logprobs=None,
                           finish_reason="stop")
    msg, finish = message(named, out, out.text)
    assert finish == "stop" and msg["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"x": 1}'}
    delta, finish = stream_delta(named.new_parser(), out, out.text)
    assert finish == "stop" and delta["tool_calls"][0]["function"]["name"] == "f"
    required = _plan(tools=[TOOL], tool_choice="required")
    out.text = '[{"name": "f", "parameters": {"x": 1}}]'
    assert message(required, out, out.text)[1] == "tool_calls"


@pytest.mark.parametrize("parser, auto", [("mistral", True), ("mistral", False), ("hermes", True), (None, False)])
def test_forced_calls_take_the_configured_parsers_ids(parser, auto):
    """A call forced by tool_choice has the id --tool-call-parser gives (mistral: 9 letters and digits, which its
    chat templates demand back; vLLM's with a Mistral tokenizer), with or without --enable-auto-tool-choice."""
    named = {"type": "function", "function": {"name": "f"}}
    out = CompletionOutput(index=0, text='{"x": 1}', token_ids=[], cumulative_logprob=None, logprobs=None,
                           finish_reason="stop")
    ids = []
    for choice, text in ((named, '{"x": 1}'), ("required", '[{"name": "f", "parameters": {"x": 1}}]')):
        plan = plan_tools(_request(tools=[TOOL], tool_choice=choice), parser, auto)
        out.text = text
        ids.append(message(plan, out, text)[0]["tool_calls"][0]["id"])
        ids.append(stream_delta(plan.new_parser(), out, text)[0]["tool_calls"][0]["id"])
    for call_id in ids:
        if parser == "mistral":
            assert len(call_id) == 9 and call_id.isalnum()
        else:
            assert call_id.startswith("call_") and len(call_id) == 29


@pytest.mark.parametrize("kw", [
    {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}},
    {"tool_choice": "required"},
    {"tool_choice": {"type": "function", "function": {"name": "f"}}},
    {"tools": [TOOL], "tool_choice": "always"},
])
def test_bad_choices_are_400_naming_tool_choice(kw):
    with pytest.raises(APIError) as e:
        _request(**kw)
    assert e.value.param == "tool_choice"


@pytest.mark.parametrize("tools,param", [
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
     "tools.0.function.parameters"),
    ([TOOL, {"type": "function", "function": {"name": "f", "description": "again"}}], "tools.1.function.name"),
])
def test_openais_tool_definition_400s(tools, param):
    """OpenAI's refusals, as /v1/responses makes them (one check, protocol.check_tools), where both were taken:
    arguments that are not an object, two tools of one name. A schema without a type is an object's."""
    with pytest.raises(APIError) as e:
        _request(tools=tools)
    assert e.value.param == param and e.value.status == 400
    _request(tools=[TOOL, {"type": "function", "function": {"name": "g", "parameters": {"properties": {}}}}])


@pytest.mark.parametrize("choice", [{}, {"tool_choice": None}, {"tool_choice": "none"}, {"tool_choice": "auto"},
                                    {"tool_choice": "required"},
                                    {"tool_choice": {"type": "function", "function": {"name": "f"}}}])
def test_an_empty_tools_is_400_naming_tools(choice):
    """OpenAI and vLLM refuse tools [] whatever tool_choice says, before reading it (vLLM's check_tool_usage: it was
    taken, as no tools); null is no tools."""
    with pytest.raises(APIError) as e:
        _request(tools=[], **choice)
    assert (e.value.status, e.value.param, e.value.code) == (400, "tools", "empty_array")
    assert str(e.value) == ("`tools` must not be an empty array. Either provide at least one tool or omit the field "
                            "entirely.")
    assert _plan(tools=None, tool_choice="none").choice == "none"


def test_auto_needs_the_flags():
    with pytest.raises(APIError) as e:
        _plan(auto=False, tools=[TOOL])
    assert e.value.param == "tool_choice" and "--enable-auto-tool-choice" in str(e.value)
    assert _plan(auto=False, tools=[TOOL], tool_choice="required").choice == "required"


def test_server_flags():
    with pytest.raises(ValueError, match="tool_call_parser"):
        ServerConfig(enable_auto_tool_choice=True)
    with pytest.raises(ValueError, match="tool_call_parser"):
        ServerConfig(tool_call_parser="nope")
    import argparse
    parser = argparse.ArgumentParser()
    add_config_args(parser, ServerConfig, "server")
    args = parser.parse_args(["--enable-auto-tool-choice", "--tool-call-parser", "hermes"])
    assert args.enable_auto_tool_choice and args.tool_call_parser == "hermes"


def test_allowed_tools_shows_only_the_named_and_its_mode_chooses():
    """tool_choice allowed_tools (OpenAI's; it was a 400): the plan holds only the tools it names, its mode is the
    choice, and a shown tool keeps its index in tools; a name not among tools is a 400 naming the entry."""
    other = {"type": "function", "function": {"name": "g", "parameters": {"type": "object"}}}
    allowed = {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
        {"type": "function", "function": {"name": "g"}}]}}
    plan = _plan(tools=[TOOL, other], tool_choice=allowed)
    assert plan.choice == "required" and plan.tools == [other] and plan.at == [1]
    assert plan.structured_outputs().json == _plan(tools=[other], tool_choice="required").structured_outputs().json
    auto = {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [
        {"type": "function", "function": {"name": "f"}}]}}
    assert _plan(tools=[TOOL, other], tool_choice=auto).choice == "auto"
    for bad in ({"type": "function", "function": {"name": "h"}}, {"type": "function", "name": "f"}):
        with pytest.raises(APIError) as e:
            _request(tools=[TOOL], tool_choice={**allowed, "allowed_tools": {"mode": "auto", "tools": [bad]}})
        assert e.value.param == "tool_choice.allowed_tools.tools.0"
