"""A chat stream's chunks, field by field, as vLLM 0.26's serving code writes them (exclude_unset per chunk): which
keys a chunk has, and which are sent as null rather than left out. Driven through chat._stream with made-up
engine outputs, no model."""
import asyncio
import json
from types import SimpleNamespace

from pagedllm.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from pagedllm.server import chat
from pagedllm.server.chat_tools import plan_tools
from pagedllm.server.protocol import ChatCompletionRequest
from pagedllm.server.serving import sse

CTX = SimpleNamespace(model_name="m", response_role="assistant", enable_prompt_tokens_details=False,
                      served_name=lambda name: "m", system_fingerprint=None, tool_call_parser=None,
                      enable_auto_tool_choice=False, enable_per_request_metrics=False)
MESSAGES = [{"role": "user", "content": "hi"}]


def _outputs(steps: list[list[tuple[str, list[int]]]], finishes: list[tuple[str, object]]) -> list[RequestOutput]:
    """DELTA outputs: steps[k][i] is choice i's (text, token ids) at step k; the last step finishes each choice."""
    outs = []
    for k, step in enumerate(steps):
        last = k == len(steps) - 1
        comps = [CompletionOutput(i, text, ids, -1.0, None, *(finishes[i] if last else (None, None)))
                 for i, (text, ids) in enumerate(step)]
        outs.append(RequestOutput("r", None, [1, 2, 3], None, comps, last, RequestMetrics(0.0)))
    return outs


def _chunks(req: ChatCompletionRequest, outs: list[RequestOutput], ctx=CTX, plan=None, thinks=None) -> list[dict]:
    async def stream():
        for out in outs:
            yield 0, out

    async def collect():
        return [c async for c in chat._stream(ctx, req, plan or plan_tools(req, None, False), "chatcmpl-1",
                                              [1, 2, 3], stream(), thinks, "user: hi\\nassistant:")]
    raw = asyncio.run(collect())
    assert all(c == sse(json.loads(c[6:])) for c in raw)   # hand-written chunks too: sse()'s bytes
    return [json.loads(c[6:]) for c in raw]


HEAD = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "m"}


def _without_created(chunk: dict) -> dict:
    assert isinstance(chunk.pop("created"), int)
    return chunk


def test_role_chunk_sends_prompt_token_ids_and_prompt_text_as_null_when_not_asked():
    """vLLM's role chunk sets prompt_token_ids and prompt_text whether asked or not: null unless asked."""
    req = ChatCompletionRequest(messages=MESSAGES, stream=True)
    first = _without_created(_chunks(req, _outputs([[("a", [5])]], [("length", None)]))[0])
    assert first == {**HEAD, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}],
                     "prompt_token_ids": None, "prompt_text": None}
    req = ChatCompletionRequest(messages=MESSAGES, stream=True, n=2, return_token_ids=True, return_prompt_text=True)
    chunks = _chunks(req, _outputs([[("a", [5]), ("b", [6])]], [("length", None)] * 2))
    for i in range(2):
        assert chunks[i]["choices"][0]["index"] == i
        assert (chunks[i]["prompt_token_ids"], chunks[i]["prompt_text"]) == ([1, 2, 3], "user: hi\\nassistant:")
    assert all("prompt_token_ids" not in c and "prompt_text" not in c for c in chunks[2:])

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]


def test_content_chunks_send_token_ids_and_only_the_last_stop_reason():
    """vLLM's content chunk sets token_ids (null unless return_token_ids) and no stop_reason; a choice's last
    chunk sets both. Plain text and text through a tool parser alike."""
    steps = [[("Hel", [5])], [("lo", [6])], [("", [2])]]
    plain = ChatCompletionRequest(messages=MESSAGES, stream=True)
    tools = ChatCompletionRequest(messages=MESSAGES, stream=True, tools=TOOLS)
    for req, plan in ((plain, None), (tools, plan_tools(tools, "hermes", True))):
        for ids in (False, True):
            req.return_token_ids = ids
            chunks = [_without_created(c) for c in _chunks(req, _outputs(steps, [("stop", 2)]), plan=plan)]
            choices = [c["choices"][0] for c in chunks[1:]]
            assert all(set(c) == {*HEAD, "choices"} for c in chunks[1:])   # no usage, no fingerprint here
            middle = [{"index": 0, "delta": {"content": t}, "logprobs": None, "finish_reason": None,
                       "token_ids": [tid] if ids else None} for t, tid in (("Hel", 5), ("lo", 6))]
            assert choices[:2] == middle
            assert choices[2]["finish_reason"] == "stop" and choices[2]["stop_reason"] == 2
            assert choices[2]["token_ids"] == ([2] if ids else None)
            assert list(choices[2]) == ["index", "delta", "logprobs", "finish_reason", "stop_reason", "token_ids"]


def test_a_step_a_parser_holds_back_still_sends_its_token_ids():
    """vLLM's: with return_token_ids, a step whose text the parser holds back (a tag not yet complete) still
    sends a chunk, an empty delta with that step's ids; without it, no chunk."""
    texts = ["<tool", "_call>", '{"name": "get_weather", ', '"arguments": {"city": "P"}}', "</tool_call>", ""]
    steps = [[(t, [10 + k])] for k, t in enumerate(texts)]
    req = ChatCompletionRequest(messages=MESSAGES, stream=True, tools=TOOLS, return_token_ids=True)
    choices = [c["choices"][0] for c in _chunks(req, _outputs(steps, [("stop", None)]),
                                                plan=plan_tools(req, "hermes", True))[1:]]
    assert [c["token_ids"] for c in choices] == [[10 + k] for k in range(len(texts))]
    assert choices[0]["delta"] == choices[1]["delta"] == {} and choices[0]["finish_reason"] is None
    assert choices[-1]["finish_reason"] == "tool_calls"
    calls = [t for c in choices for t in c["delta"].get("tool_calls", [])]
    assert calls[0]["function"]["name"] == "get_weather"
    assert "".join(t["function"]["arguments"] for t in calls) == '{"city": "P"}'
    req.return_token_ids = False
    choices = [c["choices"][0] for c in _chunks(req, _outputs(steps, [("stop", None)]),
                                                plan=plan_tools(req, "hermes", True))[1:]]
    assert all(c["delta"] or c["finish_reason"] for c in choices) and len(choices) < len(texts)


def test_top_logprobs_are_the_positions_first_entries_chosen_token_first():
    """vLLM's _get_top_logprobs takes the first top_logprobs entries of a position as the engine lists them:
    the chosen token, then the top ones by rank. A sampled token ranked 2nd comes first; one outside the top k
    is listed in place of the k-th."""
    def lp(*entries):
        return {tid: Logprob(value, rank, text) for tid, value, rank, text in entries}
    positions = [lp((6, -1.0, 2, "b"), (5, -0.5, 1, "a"), (8, -2.0, 3, "d")),   # chosen: 2nd
                 lp((9, -4.0, 7, "z"), (5, -0.5, 1, "a"), (6, -1.0, 2, "b"))]   # chosen: 7th
    out = CompletionOutput(0, "bz", [6, 9], -5.0, positions, "length", None)
    req = ChatCompletionRequest(messages=MESSAGES, stream=True, logprobs=True, top_logprobs=2)
    content = chat._logprobs(req, out)["content"]
    assert [e["token"] for e in content] == ["b", "z"]
    assert [[t["token"] for t in e["top_logprobs"]] for e in content] == [["b", "a"], ["z", "a"]]
    req.top_logprobs = -1
    assert [[t["token"] for t in e["top_logprobs"]] for e in chat._logprobs(req, out)["content"]] == \
        [["b", "a", "d"], ["z", "a", "b"]]


def test_tokens_named_by_id_give_their_alternatives_the_names_bytes():
    """return_tokens_as_token_ids, as vLLM 0.26's chat logprobs: the chosen token's bytes are its text's
    (_create_chat_logprobs encodes decoded_token), each top_logprobs entry's those of the name it shows,
    "token_id:<id>" (_get_top_logprobs encodes the token string it built)."""
    position = {6: Logprob(-1.0, 1, "\u00e9"), 5: Logprob(-2.0, 2, "a")}
    out = CompletionOutput(0, "\u00e9", [6], -1.0, [position], "length", None)
    req = ChatCompletionRequest(messages=MESSAGES, stream=True, logprobs=True, top_logprobs=2,
                                return_tokens_as_token_ids=True)
    [entry] = chat._logprobs(req, out)["content"]
    assert (entry["token"], entry["bytes"]) == ("token_id:6", [195, 169])
    assert [(t["token"], t["bytes"]) for t in entry["top_logprobs"]] == \
        [("token_id:6", list(b"token_id:6")), ("token_id:5", list(b"token_id:5"))]
    req.return_tokens_as_token_ids = False   # by text: the text's bytes in both places
    [entry] = chat._logprobs(req, out)["content"]
    assert [t["bytes"] for t in entry["top_logprobs"]] == [[195, 169], [97]]


def test_after_the_reasoning_each_step_is_content_even_empty():
    """vLLM's: once the reasoning ended (in an earlier step, or before the answer: thinking off), a step's text
    passes on as content without a tool parser, "" too: the EOS step that ends the answer is
    `"delta": {"content": ""}`, not an empty delta. The step that writes </think> alone sends nothing."""
    ctx = SimpleNamespace(**vars(CTX), reasoning_parser="qwen3")
    steps = [[("Hmm", [5])], [("</think>", [6])], [("Hi", [7])], [("", [2])]]
    req = ChatCompletionRequest(messages=MESSAGES, stream=True)
    choices = [c["choices"][0] for c in _chunks(req, _outputs(steps, [("stop", None)]), ctx=ctx, thinks=True)[1:]]
    assert [c["delta"] for c in choices] == [{"reasoning": "Hmm"}, {"content": "Hi"}, {"content": ""}]
    assert choices[-1]["finish_reason"] == "stop"
    steps = [[("Hi", [7])], [("", [8])], [("", [2])]]   # thinking off: all content
    choices = [c["choices"][0] for c in _chunks(req, _outputs(steps, [("stop", None)]), ctx=ctx, thinks=False)[1:]]
    assert [c["delta"] for c in choices] == [{"content": "Hi"}, {"content": ""}, {"content": ""}]
    # a server with a tool parser reads the content through it (vLLM's): an empty step's text is no content there
    ctx.enable_auto_tool_choice, ctx.tool_call_parser = True, "hermes"
    choices = [c["choices"][0] for c in _chunks(req, _outputs(steps, [("stop", None)]), ctx=ctx, thinks=False)[1:]]
    assert [c["delta"] for c in choices] == [{"content": "Hi"}, {}]


def test_a_tool_parser_server_sends_no_empty_content_without_tools():
    """vLLM's: with --enable-auto-tool-choice and a --tool-call-parser every answer goes through the parser,
    tool_choice none (a request without tools) too, which passes a step's text on as content only when there is
    some: an empty step sends nothing, and an empty last step an empty delta with its finish."""
    steps = [[("Hi", [7])], [("", [8])], [("", [2])]]
    ctx = SimpleNamespace(**{**vars(CTX), "enable_auto_tool_choice": True, "tool_call_parser": "hermes"})
    for ids in (False, True):
        req = ChatCompletionRequest(messages=MESSAGES, stream=True, return_token_ids=ids)
        choices = [c["choices"][0] for c in _chunks(req, _outputs(steps, [("stop", None)]), ctx=ctx)[1:]]
        if ids:   # every step's ids still go out
            assert [(c["delta"], c["token_ids"]) for c in choices] == [({"content": "Hi"}, [7]), ({}, [8]), ({}, [2])]
        else:
            assert [c["delta"] for c in choices] == [{"content": "Hi"}, {}]
        assert choices[-1]["finish_reason"] == "stop"
    req = ChatCompletionRequest(messages=MESSAGES, stream=True)   # no tool parser: "" is content
    assert [c["choices"][0]["delta"] for c in _chunks(req, _outputs(steps, [("stop", None)]))[1:]] == \
        [{"content": "Hi"}, {"content": ""}, {"content": ""}]


def test_usage_chunk_says_created_cache_tokens_beside_cached_tokens():
    """vLLM 0.26's chat usage under --enable-prompt-tokens-details: prompt_tokens_details has created_cache_tokens
    too, the prompt tokens the prefill wrote into the prefix cache (the prompt's full blocks less those found
    cached; 0 with prefix caching off). The last chunk, choices [], carries it."""
    for caching, created in ((True, 2), (False, 0)):
        engine = SimpleNamespace(input_processor=SimpleNamespace(block_size=2, enable_prefix_caching=caching))
        ctx = SimpleNamespace(**{**vars(CTX), "enable_prompt_tokens_details": True, "engine": engine})
        req = ChatCompletionRequest(messages=MESSAGES, stream=True, stream_options={"include_usage": True})
        last = _without_created(_chunks(req, _outputs([[("a", [5])]], [("length", None)]), ctx=ctx)[-1])
        assert last == {**HEAD, "choices": [], "usage": {
            "prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4,
            "prompt_tokens_details": {"cached_tokens": 0, "created_cache_tokens": created}}}


def test_usage_chunk_carries_the_per_request_metrics():
    """--enable-per-request-metrics (vLLM 0.26's): the usage chunk, and only it, has `metrics`, the last output's
    timings without their null fields (one token: no mean_itl_ms); n > 1: none."""
    ctx = SimpleNamespace(**{**vars(CTX), "enable_per_request_metrics": True})
    outs = _outputs([[("a", [5])]], [("length", None)])
    outs[-1].metrics = RequestMetrics(1.0, first_scheduled_time=1.5, first_token_time=2.0, last_token_time=2.0)
    req = ChatCompletionRequest(messages=MESSAGES, stream=True, stream_options={"include_usage": True})
    chunks = _chunks(req, outs, ctx=ctx)
    assert chunks[-1]["metrics"] == {"time_to_first_token_ms": 500.0, "generation_time_ms": 0.0,
                                     "queue_time_ms": 500.0, "tokens_per_second": 2.0}
    assert all("metrics" not in c for c in chunks[:-1])
    req = ChatCompletionRequest(messages=MESSAGES, stream=True, n=2, stream_options={"include_usage": True})
    assert "metrics" not in _chunks(req, _outputs([[("a", [5]), ("b", [6])]], [("length", None)] * 2), ctx=ctx)[-1]
