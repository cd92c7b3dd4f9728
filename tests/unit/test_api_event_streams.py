"""The chat stream's chunks turned into Anthropic's and the Responses API's events (server/anthropic.py,
server/responses_output.py), on hand-made chunks: reasoning, then text, then two tool calls in one answer, each in
pieces; blocks / items opened and closed in order; usage and stop reasons; an error mid-stream ends the stream
with that API's error event."""
import asyncio
import json

from pagedllm.engine.async_llm import EngineGenerateError
from pagedllm.server import anthropic, responses_output
from pagedllm.server.serving import sse


def _chunk(delta: dict | None = None, finish_reason=None, stop_reason=None, **extra) -> str:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                        "finish_reason": finish_reason, "stop_reason": stop_reason}]
    return sse({"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "served", "choices": choices,
                **extra})


def _call(index: int, call_id: str | None, name: str | None, arguments: str) -> dict:
    if call_id is None:
        return {"index": index, "function": {"arguments": arguments}}
    return {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


CHUNKS = [_chunk({"role": "assistant", "content": ""}, prompt_token_ids=[1, 2, 3]),
          _chunk({"reasoning": "Let me "}), _chunk({"reasoning": "think."}),
          _chunk({"content": "Calling"}), _chunk({"content": " tools."}),
          _chunk({"tool_calls": [_call(0, "call_a", "get_weather", '{"city": ')]}),
          _chunk({"tool_calls": [_call(0, None, None, '"Paris"}')]}),
          _chunk({"tool_calls": [_call(1, "call_b", "now", "{}")]}, finish_reason="tool_calls"),
          _chunk(usage={"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12})]


async def _aiter(items, error: Exception | None = None):
    for item in items:
        yield item
    if error is not None:
        raise error


def _collect(events) -> list[tuple[str, dict]]:
    async def run():
        return [e async for e in events]
    out = []
    for raw in asyncio.run(run()):
        name, data = raw.split("\n", 2)[:2]
        assert name.startswith("event: ") and data.startswith("data: ") and raw.endswith("\n\n"), raw
        out.append((name[7:], json.loads(data[6:])))
        assert out[-1][1]["type"] == out[-1][0]
    return out


def test_anthropic_events_open_one_block_at_a_time():
    events = _collect(anthropic._events(_aiter(CHUNKS), []))
    names = [n for n, _ in events]
    assert names == ["message_start",
                     "content_block_start", "content_block_delta", "content_block_delta", "content_block_delta",
                     "content_block_stop", "content_block_start", "content_block_delta", "content_block_delta",
                     "content_block_stop", "content_block_start", "content_block_delta", "content_block_delta",
                     "content_block_stop", "content_block_start", "content_block_delta",
                     "content_block_stop", "message_delta", "message_stop"]
    assert events[0][1]["message"]["usage"] == {"input_tokens": 3, "output_tokens": 0}
    starts = [d["content_block"] for n, d in events if n == "content_block_start"]
    assert [b["type"] for b in starts] == ["thinking", "text", "tool_use", "tool_use"]
    # vLLM's (and Anthropic's): a thinking block starts without a signature; its signature_delta gives it
    assert starts[:2] == [{"type": "thinking", "thinking": ""}, {"type": "text", "text": ""}]
    assert [(b["id"], b["name"]) for b in starts[2:]] == [("call_a", "get_weather"), ("call_b", "now")]
    deltas = [(d["index"], d["delta"]) for n, d in events if n == "content_block_delta"]
    joined = {}
    for index, delta in deltas:
        key = next(k for k in ("thinking", "signature", "text", "partial_json") if k in delta)
        joined[index] = joined.get(index, "") + delta[key]
    assert joined == {0: "Let me think.", 1: "Calling tools.", 2: '{"city": "Paris"}', 3: "{}"}
    # a thinking block ends with its signature (Anthropic's and vLLM's streams): the non-streamed block's, ""
    assert deltas[2] == (0, {"type": "signature_delta", "signature": ""})
    assert events[-2][1] == {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                             "usage": {"input_tokens": 3, "output_tokens": 9}}


def test_anthropic_message_is_named_as_the_chat_answer():
    """vLLM's message id and model are the chat completion's: its "chatcmpl-..." id (X-Request-Id's too) and the
    served model's name (an alias asked for is the first --served-model-name); they were a "msg_..." of our own
    and the request's model."""
    events = _collect(anthropic._events(_aiter(CHUNKS), []))
    message = events[0][1]["message"]
    assert (message["id"], message["model"]) == ("chatcmpl-1", "served")
    chat = {"id": "chatcmpl-2", "model": "served", "choices": [{"index": 0, "message": {"content": "Hi"},
                                                                "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    answer = anthropic.to_message(chat, [])
    assert (answer["id"], answer["model"]) == ("chatcmpl-2", "served")


def test_anthropic_text_during_a_tool_use_block_comes_after_it_in_one_delta():
    """vLLM holds text that comes while a tool_use block is open and gives it after that block ends, as one text
    block of one delta; the call's later arguments stay in its block (ours closed the call's block at the text,
    and dropped its arguments after)."""
    chunks = [_chunk({"role": "assistant", "content": ""}),
              _chunk({"tool_calls": [_call(0, "call_a", "get_weather", '{"city": ')]}),
              _chunk({"content": "Some"}), _chunk({"content": " text"}),
              _chunk({"tool_calls": [_call(0, None, None, '"Paris"}')]}),
              _chunk({"tool_calls": [_call(1, "call_b", "now", "{}")]}), _chunk({"content": "End"}),
              _chunk({}, finish_reason="tool_calls")]
    events = _collect(anthropic._events(_aiter(chunks), []))
    blocks = [(d["index"], n, d.get("content_block", {}).get("type") or d.get("delta", {}).get("type"))
              for n, d in events if n.startswith("content_block")]
    assert blocks == [(0, "content_block_start", "tool_use"), (0, "content_block_delta", "input_json_delta"),
                      (0, "content_block_delta", "input_json_delta"), (0, "content_block_stop", None),
                      (1, "content_block_start", "text"), (1, "content_block_delta", "text_delta"),
                      (1, "content_block_stop", None),
                      (2, "content_block_start", "tool_use"), (2, "content_block_delta", "input_json_delta"),
                      (2, "content_block_stop", None),
                      (3, "content_block_start", "text"), (3, "content_block_delta", "text_delta"),
                      (3, "content_block_stop", None)]
    texts = [d["delta"].get("text") or d["delta"].get("partial_json") for n, d in events if n == "content_block_delta"]
    assert texts == ['{"city": ', '"Paris"}', "Some text", "{}", "End"]


def test_anthropic_empty_answer_is_one_empty_text_block():
    """vLLM answers an empty completion (not streamed) with one empty text block, Anthropic's shape, which clients
    that read content[0] rely on; it was no block at all."""
    chat = {"id": "chatcmpl-1", "model": "served", "usage": {"prompt_tokens": 3, "completion_tokens": 1,
                                                             "total_tokens": 4},
            "choices": [{"index": 0, "message": {"role": "assistant", "content": ""}, "finish_reason": "stop"}]}
    assert anthropic.to_message(chat, [])["content"] == [{"type": "text", "text": ""}]


def test_anthropic_stop_sequence_and_hidden_thinking():
    chunks = [_chunk({"role": "assistant", "content": ""}), _chunk({"reasoning": "hm"}),
              _chunk({"content": "Hi"}, finish_reason="stop", stop_reason="END")]
    events = _collect(anthropic._events(_aiter(chunks), ["END"], shown=False))
    assert [d["delta"]["type"] for n, d in events if n == "content_block_delta"] == ["signature_delta", "text_delta"]
    assert events[-2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "END"}
    # max_tokens within the thinking: the block still ends with its signature
    cut = _collect(anthropic._events(_aiter([*chunks[:2], _chunk({"reasoning": "m"}, finish_reason="length")]),
                                     []))
    assert [(n, d.get("delta", {}).get("type")) for n, d in cut[-4:-2]] == [("content_block_delta", "signature_delta"),
                                                                          ("content_block_stop", None)]


def test_anthropic_usage_is_the_chat_usage_as_vllm_builds_it():
    """vLLM's message_delta usage is the chat's final usage made Anthropic's: input_tokens too (it had output_tokens
    alone). With --enable-prompt-tokens-details the prompt tokens read from the cache are cache_read_input_tokens
    and those written to it (chat's created_cache_tokens) cache_creation_input_tokens, apart from input_tokens
    (Anthropic's total input is their sum), streamed or not."""
    usage = {"prompt_tokens": 40, "completion_tokens": 1, "total_tokens": 41,
             "prompt_tokens_details": {"cached_tokens": 16, "created_cache_tokens": 16}}
    chunks = [_chunk({"role": "assistant", "content": ""}, prompt_token_ids=list(range(40))),
              _chunk({"content": "Hi"}, finish_reason="stop"), _chunk(usage=usage)]
    events = _collect(anthropic._events(_aiter(chunks), []))
    assert events[0][1]["message"]["usage"] == {"input_tokens": 40, "output_tokens": 0}
    assert events[-2][1]["usage"] == {"input_tokens": 8, "output_tokens": 1, "cache_creation_input_tokens": 16,
                                      "cache_read_input_tokens": 16}
    chat = {"id": "chatcmpl-1", "model": "served", "usage": usage,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}]}
    assert anthropic.to_message(chat, [])["usage"] == events[-2][1]["usage"]


def test_responses_events_items_in_order_with_sequence_numbers():
    head = {"id": "resp_1", "object": "response", "status": "in_progress", "output": [], "usage": None}
    events = _collect(responses_output._events(_aiter(CHUNKS), head))
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    names = [n for n, _ in events]
    assert names[:2] == ["response.created", "response.in_progress"] and names[-1] == "response.completed"
    added = [d for n, d in events if n == "response.output_item.added"]
    done = [d for n, d in events if n == "response.output_item.done"]
    assert [a["item"]["type"] for a in added] == ["reasoning", "message", "function_call", "function_call"]
    assert [a["output_index"] for a in added] == [d["output_index"] for d in done] == [0, 1, 2, 3]
    assert [a["item"]["id"] for a in added] == [d["item"]["id"] for d in done]
    final = events[-1][1]["response"]
    assert final["output"] == [d["item"] for d in done] and final["status"] == "completed"
    assert final["output"][0]["content"] == [{"type": "reasoning_text", "text": "Let me think."}]
    assert final["output"][1]["content"][0]["text"] == "Calling tools."
    assert [(o["call_id"], o["name"], o["arguments"]) for o in final["output"][2:]] == \
        [("call_a", "get_weather", '{"city": "Paris"}'), ("call_b", "now", "{}")]
    assert final["usage"] == {"input_tokens": 3, "output_tokens": 9, "total_tokens": 12,
                              "input_tokens_details": {"cached_tokens": 0},
                              "output_tokens_details": {"reasoning_tokens": 0}}
    args = "".join(d["delta"] for n, d in events if n == "response.function_call_arguments.delta")
    assert args == '{"city": "Paris"}{}'


def test_an_error_mid_stream_ends_it_with_the_apis_error_event():
    head = {"id": "resp_1", "object": "response", "status": "in_progress", "output": [], "usage": None}
    events = _collect(responses_output._events(_aiter(CHUNKS[:3], RuntimeError("engine died")), head))
    assert events[-1][0] == "error" and events[-1][1]["message"] == "engine died"
    assert events[-1][1]["sequence_number"] == len(events) - 1
    stream = anthropic.AnthropicSSE(None, [], _aiter([]), "response_format")
    error = stream.error_event(RuntimeError("engine died"))
    assert error == ('event: error\ndata: {"type":"error","error":{"type":"api_error","message":"engine died"}}'
                     '\n\n')
    # the client's fault found mid-way (a constraint that did not compile in time) is the 400 a non-streamed
    # request answers, as in chat's stream: invalid_request_error, naming the Anthropic field (it was api_error)
    error = stream.error_event(EngineGenerateError("the grammar did not compile within 30 s", status=400))
    assert json.loads(error.split("data: ", 1)[1]) == {"type": "error", "error": {
        "type": "invalid_request_error", "message": "output_config.format: the grammar did not compile within 30 s"}}


def test_anthropic_forced_call_is_tool_use():
    """A call forced by name finishes chat's answer with "stop" (OpenAI's and vLLM's); Anthropic's stop_reason
    is tool_use for it, as for any call, streamed and not."""
    forced = [_chunk({"role": "assistant", "content": ""}),
              _chunk({"tool_calls": [_call(0, "call_a", "get_weather", '{"city": "Paris"}')]}, finish_reason="stop")]
    [delta] = [d for n, d in _collect(anthropic._events(_aiter(forced), [])) if n == "message_delta"]
    assert delta["delta"]["stop_reason"] == "tool_use"
    chat = {"id": "chatcmpl-1", "model": "served", "choices": [{"index": 0, "finish_reason": "stop",
                                                                "stop_reason": None, "message": {
        "role": "assistant", "content": None, "tool_calls": [{"id": "call_a", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}}
    assert anthropic.to_message(chat, [])["stop_reason"] == "tool_use"
    chat["choices"][0]["message"]["tool_calls"] = []
    assert anthropic.to_message(chat, [])["stop_reason"] == "end_turn"
