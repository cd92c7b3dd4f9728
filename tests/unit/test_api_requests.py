"""Requests of /v1/responses and /v1/messages as the chat request each becomes (server/responses_input.py,
server/anthropic.py), without an engine: the prompt they render must be the one vLLM renders for them."""
from types import SimpleNamespace

from pagedllm.chat_template import template_message
from pagedllm.server import anthropic, responses, responses_input, responses_output, responses_request

NO_PARSER = SimpleNamespace(reasoning_parser=None)   # the ServingContext fields anthropic.to_chat reads


def _responses_chat(body: dict):
    req = responses_request.ResponsesRequest.model_validate(body)
    return responses_input.to_chat(req, responses_input._messages(req, []))


def test_text_parts_and_blocks_join_with_newlines_as_chat_content_parts_do():
    # chat's content parts (and vLLM's, for these routes too) are joined by newlines: "Hello" "World" is not
    # "HelloWorld"
    parts = [{"type": "input_text", "text": "Hello"}, {"type": "input_text", "text": "World"}]
    chat = _responses_chat({"input": [
        {"role": "user", "content": parts},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": parts}]})
    # (Responses' parts reach the template as chat's parts, which the string content format joins)
    assert [template_message(m.as_template_input())["content"] for m in chat.messages] == \
        ["Hello\nWorld", "", "Hello\nWorld"]
    blocks = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "World"}]
    req = anthropic.MessagesRequest.model_validate({"model": "m", "max_tokens": 3, "messages": [
        {"role": "user", "content": blocks},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": blocks}]}]})
    assert [m.content for m in anthropic.to_chat(NO_PARSER, req).messages] == ["Hello\nWorld", None, "Hello\nWorld"]


def test_an_assistant_message_in_progress_or_incomplete_is_continued():
    # vLLM's partial message (Anthropic's prefill): the answer continues the last assistant message
    for status, continued in (("in_progress", True), ("incomplete", True), ("completed", False), (None, False)):
        last = {"role": "assistant", "content": "The best answer is (", **({"status": status} if status else {})}
        chat = _responses_chat({"input": [{"role": "user", "content": "Greek name for Sun? (A) Sol (B) Helios"}, last]})
        assert (chat.continue_final_message, chat.add_generation_prompt) == (continued, not continued), status
    chat = _responses_chat({"input": [{"role": "user", "content": "Hi", "status": "incomplete"}]})
    assert not chat.continue_final_message   # only an assistant's message is continued


def test_system_blocks_join_as_vllms_without_the_attribution_header():
    """vLLM joins the system blocks as they are and drops Claude Code's billing header block (a per-request hash
    that would defeat prefix caching)."""
    system = [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1; cch=8f3a;"},
              {"type": "text", "text": "You are a helper. "}, {"type": "text", "text": "Be brief."}]
    req = anthropic.MessagesRequest.model_validate({"model": "m", "max_tokens": 3, "system": system,
                                                    "messages": [{"role": "user", "content": "Hi"}]})
    assert [(m.role, m.content) for m in anthropic.to_chat(NO_PARSER, req).messages] == [
        ("system", "You are a helper. Be brief."), ("user", "Hi")]
    only_header = anthropic.MessagesRequest.model_validate({"model": "m", "max_tokens": 3, "system": system[:1],
                                                            "messages": [{"role": "user", "content": "Hi"}]})
    assert [m.role for m in anthropic.to_chat(NO_PARSER, only_header).messages] == ["user"]


def test_redacted_thinking_blocks_are_taken_and_left_out():
    """A conversation replayed whole (Claude Code's history) may hold redacted_thinking blocks: Anthropic's API and
    vLLM take them; their data is opaque (encrypted reasoning), so the prompt is the one without them (it was a
    400)."""
    def chat(assistant: list) -> list:
        req = anthropic.MessagesRequest.model_validate({"model": "m", "max_tokens": 3, "messages": [
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": assistant},
            {"role": "user", "content": "Go on"}]})
        return [m.model_dump(exclude_none=True) for m in anthropic.to_chat(NO_PARSER, req).messages]
    text = {"type": "text", "text": "Hello"}
    assert chat([{"type": "redacted_thinking", "data": "EmwKAhgBEgy3va"}, text]) == chat([text])



def test_a_tools_strict_and_defer_loading_reach_the_template_as_vllms():
    """Anthropic's tool strict and defer_loading (Claude Code's tool search) reach the chat template when given,
    as vLLM passes them (FunctionDefinition's dump drops them only when null): strict was left out of the prompt
    and defer_loading a 400. An input_schema without a type gets vLLM's "type": "object"."""
    def tools(**fields) -> list:
        tool = {"name": "f", "input_schema": {"properties": {}}, **fields}
        req = anthropic.MessagesRequest.model_validate({"model": "m", "max_tokens": 3, "tools": [tool],
                                                        "messages": [{"role": "user", "content": "Hi"}]})
        return [t.as_template_input()["function"] for t in anthropic.to_chat(NO_PARSER, req).tools]
    assert tools() == [{"name": "f", "description": None, "parameters": {"properties": {}, "type": "object"}}]
    assert tools(strict=True, defer_loading=True)[0] == {**tools()[0], "strict": True, "defer_loading": True}
    assert tools(strict=False)[0]["strict"] is False


def test_messages_blocks_as_vllm_converts_them():
    """An empty text block is left out (it added a newline); a final assistant message with a tool_use is a
    whole turn, not continued (continuing cut its call out of the prompt); a tool_result's tool_reference blocks
    become a tool message of references after its text (vLLM's; they were a 400); a model must be named."""
    import pytest
    from pydantic import ValidationError

    def chat(messages):
        return anthropic.to_chat(NO_PARSER, anthropic.MessagesRequest.model_validate(
            {"model": "m", "max_tokens": 3, "messages": messages}))
    text = chat([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": ""}]}])
    assert [m.content for m in text.messages] == ["a"]
    call = {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}
    ended = chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": [
        {"type": "text", "text": "Sure"}, call]}])
    assert (ended.continue_final_message, ended.add_generation_prompt) == (False, True)
    prefill = chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure"}])
    assert (prefill.continue_final_message, prefill.add_generation_prompt) == (True, False)
    result = {"type": "tool_result", "tool_use_id": "t1", "content": [
        {"type": "text", "text": "found"}, {"type": "tool_reference", "tool_name": "get_weather"}]}
    refs = chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": [call]},
                 {"role": "user", "content": [result]}])
    assert [(m.role, m.content) for m in refs.messages[2:]] == [
        ("tool", "found"), ("tool", [{"type": "tool_reference", "name": "get_weather"}])]
    with pytest.raises(ValidationError, match="model"):
        anthropic.MessagesRequest.model_validate({"model": "", "max_tokens": 3,
                                                  "messages": [{"role": "user", "content": "hi"}]})


def test_a_text_blocks_citations_are_taken_and_left_out():
    """A text block's citations (Anthropic's TextBlockParam has them; a Claude answer replayed carries
    "citations": null) change nothing in the prompt, as in vLLM (it was a 400: 'Extra inputs are not
    permitted')."""
    def chat(**citations) -> list:
        req = anthropic.MessagesRequest.model_validate({"model": "m", "max_tokens": 3, "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": [{"type": "text", "text": "Hello", **citations}]},
            {"role": "user", "content": "Go on"}]})
        return [m.model_dump(exclude_none=True) for m in anthropic.to_chat(NO_PARSER, req).messages]
    assert chat(citations=None) == chat(citations=[]) == chat()


def test_a_null_stream_is_false():
    """"stream": null (a client that writes every field) is false, as vLLM takes it and as chat's is (it was a
    400: 'stream: Input should be a valid boolean')."""
    body = {"model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}]}
    req = anthropic.MessagesRequest.model_validate({**body, "stream": None})
    chat = anthropic.to_chat(NO_PARSER, req)
    assert not req.stream and chat.stream is False
    plain = anthropic.to_chat(NO_PARSER, anthropic.MessagesRequest.model_validate(body))
    assert chat.model_dump() == plain.model_dump()


def test_a_reasoning_item_sent_back_as_this_server_sent_it():
    """With include reasoning.encrypted_content a reasoning item carries its text twice (content, and the opaque
    encrypted_content); sent back whole, as the openai SDK's output items and the Agents SDK's replay send it,
    it is the next assistant message's reasoning (it was a 400). Two different reasonings are still a 400."""
    from pagedllm.server.errors import APIError
    item = responses_output._reasoning_item("rs_1", "Think first.", encrypted=True)
    turn = [{"role": "user", "content": "Hi"}, item, {"role": "assistant", "content": "Hello"}]
    chat = _responses_chat({"input": turn})
    assert (chat.messages[1].role, chat.messages[1].reasoning) == ("assistant", "Think first.")
    other = {**item, "content": [{"type": "reasoning_text", "text": "Something else."}]}
    try:
        _responses_chat({"input": [turn[0], other, turn[2]]})
        raise AssertionError("two reasonings were taken")
    except APIError as e:
        assert e.status == 400 and e.param == "input.1.encrypted_content"


def test_a_reasoning_items_string_content_is_its_text():
    """A reasoning item's content given as a string is its text, as a message item's is (it was a 500)."""
    def reasoning(content) -> str:
        chat = _responses_chat({"input": [{"role": "user", "content": "Hi"}, {"type": "reasoning", "content": content},
                                          {"role": "assistant", "content": "Hello"}]})
        return chat.messages[1].reasoning
    parts = [{"type": "reasoning_text", "text": "Think first."}]
    assert reasoning("Think first.") == reasoning(parts) == "Think first."


def test_a_reasoning_item_of_only_a_summary_is_its_summarys_text():
    """A reasoning item without content or encrypted_content (one from a server that sends summaries) is the
    reasoning its summary says, as vLLM reads it (the summary was dropped: an empty reasoning)."""
    summary = [{"type": "summary_text", "text": "Greet back."}, {"type": "summary_text", "text": "Be brief."}]
    chat = _responses_chat({"input": [{"role": "user", "content": "Hi"}, {"type": "reasoning", "summary": summary},
                                      {"role": "assistant", "content": "Hello"}]})
    assert chat.messages[1].reasoning == "Greet back.\nBe brief."


def test_a_null_responses_stream_is_false():
    """/v1/responses' "stream": null is false too, as vLLM takes it (it was a 400)."""
    chat = _responses_chat({"input": "Hi", "stream": None})
    assert chat.stream is False and chat.model_dump() == _responses_chat({"input": "Hi"}).model_dump()


def test_responses_stream_options_and_service_tier_are_openais():
    """stream_options takes OpenAI's one option (include_obfuscation, a no-op: deltas here carry no padding) and
    service_tier OpenAI's tiers, as vLLM's; anything else is a 400 naming it (it was taken and ignored)."""
    import pydantic
    import pytest
    for body in ({"stream_options": {"include_obfuscation": False}}, {"service_tier": "flex"}):
        responses_request.ResponsesRequest.model_validate({"input": "Hi", **body})
    for body, loc in (({"stream_options": {"include_usage": True}}, ("stream_options", "include_usage")),
                      ({"service_tier": "gold"}, ("service_tier",))):
        with pytest.raises(pydantic.ValidationError) as e:
            responses_request.ResponsesRequest.model_validate({"input": "Hi", **body})
        assert e.value.errors()[0]["loc"] == loc


def test_an_assistant_message_with_phase_is_taken():
    """OpenAI's newer output messages carry phase (null, commentary or final_answer), and a client sends them
    back as they came: taken, as vLLM takes them, and the prompt is the one without it (it was a 400)."""
    import pydantic
    import pytest
    item = {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": "Hello.", "annotations": [], "logprobs": []}]}
    want = _responses_chat({"input": [{"role": "user", "content": "Hi"}, item]}).model_dump()
    for phase in (None, "commentary", "final_answer"):
        got = _responses_chat({"input": [{"role": "user", "content": "Hi"}, {**item, "phase": phase}]})
        assert got.model_dump() == want, phase
    with pytest.raises(pydantic.ValidationError) as e:
        responses_request.ResponsesRequest.model_validate({"input": [{**item, "phase": "draft"}]})
    assert [err["loc"][-2:] for err in e.value.errors()][-1] == (0, "phase")


def test_responses_echo_service_tier():
    """A Response has the request's service_tier, auto when unset, as vLLM's (it had none)."""
    for body, tier in (({}, "auto"), ({"service_tier": "flex"}, "flex"), ({"service_tier": None}, "auto")):
        req = responses_request.ResponsesRequest.model_validate({"input": "Hi", **body})
        assert responses_output._head(req, "resp_1", "m", {})["service_tier"] == tier


def test_retrieving_a_response_with_encrypted_reasoning():
    """GET /v1/responses/{id} with include reasoning.encrypted_content: each reasoning item as the POST with it
    sends it (it was ignored); the stored response itself is unchanged."""
    from pagedllm.server.response_store import ResponseStore, StoredResponse
    ctx = SimpleNamespace(responses=ResponseStore(3))
    output = [responses_output._reasoning_item("rs_1", "Think first."), responses_output._message_item("msg_1", "Hi.")]
    ctx.responses.put(StoredResponse({"id": "resp_1", "output": output}, []))
    got = responses.retrieve_response(ctx, "resp_1", ["reasoning.encrypted_content"])
    assert got["output"] == [responses_output._reasoning_item("rs_1", "Think first.", encrypted=True), output[1]]
    assert responses.retrieve_response(ctx, "resp_1", []) == {"id": "resp_1", "output": output}


def test_prompt_cache_retention_is_openais():
    """prompt_cache_retention (OpenAI's in_memory or 24h) is taken, as vLLM takes it, and changes nothing: the
    prefix cache evicts by room, never by age (it was an unrecognized argument); another value is a 400."""
    import pydantic
    import pytest
    for value in ("in_memory", "24h", None):
        chat = _responses_chat({"input": "Hi", "prompt_cache_retention": value})
        assert chat.model_dump() == _responses_chat({"input": "Hi"}).model_dump()
    with pytest.raises(pydantic.ValidationError) as e:
        responses_request.ResponsesRequest.model_validate({"input": "Hi", "prompt_cache_retention": "7d"})
    assert e.value.errors()[0]["loc"] == ("prompt_cache_retention",)


def test_chat_prompt_cache_retention_is_openais():
    """A chat request takes prompt_cache_retention too (OpenAI's chat field, vLLM takes it), of the one type the
    Responses field is: it changes nothing (it was an unrecognized argument); another value is a 400."""
    import pydantic
    import pytest

    from pagedllm.server.protocol import ChatCompletionRequest
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    plain = ChatCompletionRequest.model_validate(body).to_sampling_params(16, None)
    for value in ("in_memory", "24h", None):
        req = ChatCompletionRequest.model_validate({**body, "prompt_cache_retention": value})
        assert req.to_sampling_params(16, None) == plain
    with pytest.raises(pydantic.ValidationError) as e:
        ChatCompletionRequest.model_validate({**body, "prompt_cache_retention": "7d"})
    assert e.value.errors()[0]["loc"] == ("prompt_cache_retention",)


def test_an_empty_tools_is_no_tools_on_responses_and_messages():
    """Chat refuses tools [] (OpenAI's and vLLM's 400), but OpenAI's Responses API and Anthropic's Messages API take
    it, as vLLM's routes for them do (Responses' tools default to []; vLLM's Anthropic route passes no tools on):
    each is the chat request without tools, not chat's 400."""
    base = {"input": "Hi"}
    for choice in ({}, {"tool_choice": "auto"}, {"tool_choice": "none"}):
        assert _responses_chat({**base, "tools": [], **choice}).tools is None, choice
        assert (_responses_chat({**base, "tools": [], **choice}).model_dump()
                == _responses_chat({**base, **choice}).model_dump()), choice
    body = {"model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}]}
    for choice in ({}, {"tool_choice": {"type": "auto"}}, {"tool_choice": {"type": "none"}}):
        chat = anthropic.to_chat(NO_PARSER, anthropic.MessagesRequest.model_validate({**body, "tools": [], **choice}))
        plain = anthropic.to_chat(NO_PARSER, anthropic.MessagesRequest.model_validate({**body, **choice}))
        assert chat.tools is None and chat.model_dump() == plain.model_dump(), choice


def test_cache_control_on_a_text_part_is_taken_and_reaches_only_openai_format_templates():
    """Anthropic's prompt-caching mark on an OpenAI text part (LiteLLM-style clients send it; vLLM takes it): the
    prefix cache is automatic; the string format's text is the same as without it, and the openai format's part
    keeps it in LLM.chat's path, as vLLM's chat_utils (it was a 400 naming the key); the server's request drops
    it, as vLLM's request validation does."""
    from pagedllm.server.protocol import ChatCompletionRequest
    marked = {"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}}
    requests = [ChatCompletionRequest(messages=[{"role": "user", "content": [part]}])
                for part in (marked, {"type": "text", "text": "a"})]
    messages = [r.model_dump(exclude_none=True)["messages"][0] for r in requests]
    assert template_message(messages[0]) == template_message(messages[1])
    assert template_message(messages[0], "openai")["content"] == [marked]
    assert template_message(requests[0].messages[0].as_template_input(), "openai")["content"] == \
        [{"type": "text", "text": "a"}]


def test_reasoning_items_take_their_places_as_vllms():
    """A reasoning item goes to the assistant message before it when that one has none, else it opens a new one
    that the message after it joins (vLLM's responses/utils.py). It was held for the next assistant message and
    set at the end of every item: [A, R2, B] gave R2 to A, a second reasoning replaced the first, and a reasoning
    item with no assistant message after it was dropped."""
    def reasoning(text):
        return {"type": "reasoning", "id": "rs", "summary": [], "content": [{"type": "reasoning_text", "text": text}]}

    def said(text):
        return {"role": "assistant", "content": text}
    chat = _responses_chat({"input": [{"role": "user", "content": "q"}, reasoning("R1"), said("A"),
                                      reasoning("R2"), said("B"), {"role": "user", "content": "q2"}, reasoning("R3")]})
    assert [(m.role, m.content, m.reasoning) for m in chat.messages] == [
        ("user", "q", None), ("assistant", "A", "R1"), ("assistant", "B", "R2"), ("user", "q2", None),
        ("assistant", None, "R3")]
    calls = _responses_chat({"input": [{"role": "user", "content": "q"}, reasoning("R"),
                                       {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}]})
    assert [(m.role, m.reasoning, [c.id for c in m.tool_calls or []]) for m in calls.messages] == [
        ("user", None, []), ("assistant", "R", ["c1"])]


def test_a_function_call_items_arguments_that_are_no_json_name_the_item():
    """It was a 400 naming messages.2.tool_calls.0.function.arguments (a field the client never sent, its index
    moved by the instructions)."""
    import pytest
    from pagedllm.server.errors import APIError
    with pytest.raises(APIError) as e:
        _responses_chat({"instructions": "sys", "input": [
            {"role": "user", "content": "hi"},
            {"type": "function_call", "call_id": "c1", "name": "g", "arguments": "no"}]})
    assert e.value.param == "input.1.arguments"


def test_a_last_user_message_of_no_blocks_is_not_an_assistants_prefill():
    """[user, assistant, user with an empty content list]: the last message converts to none, which is no reason
    to continue the assistant's (a review's refactor read the last converted message: continued it, or an
    IndexError, a 500, where none came before; the schema fuzz found it)."""
    import pytest
    from fastapi.exceptions import RequestValidationError

    def chat(messages):
        return anthropic.to_chat(NO_PARSER, anthropic.MessagesRequest.model_validate(
            {"model": "m", "max_tokens": 3, "messages": messages}))
    after = chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure"},
                  {"role": "user", "content": []}])
    assert (after.continue_final_message, after.add_generation_prompt) == (False, True)
    with pytest.raises(RequestValidationError):   # no message at all: a 400 (messages too short)
        chat([{"role": "user", "content": []}])


def test_responses_take_no_min_p_from_the_generation_config():
    # vLLM's Responses request builds its SamplingParams without min_p: a generation config's min_p (which chat
    # and completions take for an unset field) does not apply, while its temperature, top_p and top_k do
    defaults = {"min_p": 0.3, "temperature": 0.5, "top_p": 0.8, "top_k": 4}
    params = _responses_chat({"input": "hi"}).to_sampling_params(8, None, defaults=defaults)
    assert (params.min_p, params.temperature, params.top_p, params.top_k) == (0.0, 0.5, 0.8, 4)
