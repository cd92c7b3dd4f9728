"""Streamed chunks are written by hand (serving.sse_prefix): every one must be the bytes sse() writes for the
same dict, i.e. json.dumps with compact separators and ASCII escapes, keys in the same order."""
import asyncio
import json
import math
from types import SimpleNamespace

from pagedllm.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from pagedllm.server import chat, completions
from pagedllm.server.protocol import ChatCompletionRequest, CompletionRequest
from pagedllm.server.chat_tools import plan_tools
from pagedllm.server.serving import SSEResponse, json_value, merge, sse, sse_prefix

TEXTS = ["Once", ' "quoted" \\ back\\slash', "tab\there\nnewline\r\x00\x1f\x7f", "héllo 日本語 🙂 \u2028\ufffd", ""]


def _lp(*pairs) -> dict:
    return {tid: Logprob(value, rank, text) for tid, value, rank, text in pairs}


def _outputs(n: int, logprobs: bool) -> list[RequestOutput]:
    """A stream of DELTA outputs: every text kind, then the finishes (length, a stop string, a stop token id)."""
    outs = []
    lps = [_lp((5, -0.25, 1, "Once"), (6, -1.5, 2, ' "q"')), _lp((7, -math.inf, 3, "\n"), (8, 0.0, 1, "日")),
           _lp((9, -1e-12, 1, "🙂"), (10, -3.0, 2, "\ufffd")), _lp((11, -2.5, 7, ""), (12, -0.1, 1, "x")),
           _lp((13, -7.0, 1, "end"))]
    for step, text in enumerate(TEXTS):
        last = step == len(TEXTS) - 1
        finish = [("length", None), ("stop", "end"), ("stop", 151645)]
        comps = [CompletionOutput(i, text, [5 + 2 * step], -1.0, [lps[step]] if logprobs else None,
                                  *(finish[i % 3] if last else (None, None)))
                 for i in range(n)]
        outs.append(RequestOutput("r", None, [1, 2, 3], None, comps, last, RequestMetrics(0.0)))
    return outs


async def _stream(outs):
    for out in outs:
        yield out


def _chunks(gen) -> list[str]:
    async def collect():
        return [chunk async for chunk in gen]
    return asyncio.run(collect())


def _check(chunks: list[str]):
    assert chunks
    for chunk in chunks:
        assert chunk.startswith("data: ") and chunk.endswith("\n\n")
        obj = json.loads(chunk[len("data: "):])
        assert chunk == sse(obj) == f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


CTX = SimpleNamespace(model_name="the-model", response_role="assistant",   # ServingContext's defaults
                      enable_prompt_tokens_details=False, served_name=lambda name: "the-model",
                      system_fingerprint="fp-1",   # a chunk that carries it too is sse()'s bytes
                      enable_auto_tool_choice=False, tool_call_parser=None, enable_per_request_metrics=False)


def test_completion_chunks_are_sses_bytes():
    for n in (1, 3):
        for logprobs in (None, 2):
            for echo, ids in ((False, False), (True, False), (False, True)):
                req = CompletionRequest(prompt=[[1, 2, 3], [4]], n=n, logprobs=logprobs, echo=echo, stream=True,
                                        stream_options={"include_usage": True}, return_token_ids=ids)
                streams = [_stream(_outputs(n, logprobs is not None)) for _ in range(2)]
                chunks = _chunks(completions._stream(CTX, req, "cmpl-1", ["prompt \"text\" ü", ""], 4,
                                                     merge(streams), ["", ""]))
                _check(chunks)
                assert len(chunks) == 2 * n * len(TEXTS) + 1   # each choice's chunks, then usage
                first = json.loads(chunks[0][6:])
                assert first["choices"][0]["text"] == ("prompt \"text\" ü" if echo else "") + TEXTS[0]
                assert (first["choices"][0]["logprobs"] is None) == (logprobs is None)
                choices = [json.loads(c[6:])["choices"][0] for c in chunks[:-1]]
                finishes = [(c["finish_reason"], c["stop_reason"]) for c in choices if c["finish_reason"]]
                expected = [("length", None), ("stop", "end"), ("stop", 151645)][:n] * 2
                assert sorted(finishes, key=str) == sorted(expected, key=str)
                assert sorted(c["index"] for c in choices) == sorted(list(range(2 * n)) * len(TEXTS))
                if ids:   # the prompt's ids in each choice's first chunk only, each chunk its own ids
                    assert sum(c["prompt_token_ids"] == [1, 2, 3] for c in choices) == 2 * n
                    assert all(c["token_ids"] for c in choices)


def test_chat_chunks_are_sses_bytes():
    for n in (1, 3):
        for logprobs, ids in ((False, False), (True, False), (False, True)):
            req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], n=n, logprobs=logprobs,
                                        top_logprobs=1 if logprobs else None, stream=True,
                                        stream_options={"include_usage": True}, return_token_ids=ids)
            chunks = _chunks(chat._stream(CTX, req, plan_tools(req, None, False), "chatcmpl-1", [1, 2, 3],
                                          merge([_stream(_outputs(n, logprobs))]), None, ""))
            _check(chunks)
            assert len(chunks) == n + n * len(TEXTS) + 1   # role chunks, content chunks, usage
            contents = [json.loads(c[6:])["choices"][0]["delta"]["content"] for c in chunks[n:n + len(TEXTS) * n:n]]
            assert contents == TEXTS
            if ids:
                assert all(json.loads(c[6:])["choices"][0]["token_ids"] for c in chunks[n:-1])


def test_fingerprint_on_each_choices_last_chunk_without_a_usage_chunk():
    """vLLM's: a choice's last chunk (its finish_reason set) carries system_fingerprint when no usage chunk ends
    the stream (with one, only that chunk has it); written by hand, as sse() writes it."""
    for n in (1, 2):
        for logprobs in (None, 2):
            req = CompletionRequest(prompt=[[1, 2, 3], [4]], n=n, logprobs=logprobs, stream=True)
            chunks = _chunks(completions._stream(CTX, req, "cmpl-1", ["", ""], 4,
                                                 merge([_stream(_outputs(n, logprobs is not None))
                                                        for _ in range(2)]), ["", ""]))
            _check(chunks)
            objs = [json.loads(c[6:]) for c in chunks]
            assert [o.get("system_fingerprint") for o in objs] == [
                "fp-1" if o["choices"][0]["finish_reason"] else None for o in objs]
            assert sum("system_fingerprint" in o for o in objs) == 2 * n
        req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], n=n, stream=True)
        chunks = _chunks(chat._stream(CTX, req, plan_tools(req, None, False), "chatcmpl-1", [1, 2, 3],
                                      merge([_stream(_outputs(n, False))]), None, ""))
        _check(chunks)
        objs = [json.loads(c[6:]) for c in chunks]
        assert [o.get("system_fingerprint") for o in objs] == [
            "fp-1" if o["choices"][0]["finish_reason"] else None for o in objs]
        assert sum("system_fingerprint" in o for o in objs) == n


def test_head_prefix_and_values():
    head = {"id": "cmpl-\"x\"", "object": "text_completion", "created": 17, "model": "m/ü"}
    choice = {"index": 2, "text": "a"}
    assert sse_prefix(head) + json.dumps(choice, separators=(",", ":")) + "]}\n\n" == sse({**head, "choices": [choice]})
    for value in (None, "x\n\"ü", 0, -3, 151645, 1.5, -math.inf, math.nan, True, [1, None], {"a": [0.25]}):
        assert json_value(value) == json.dumps(value, separators=(",", ":"))


def test_sse_response_bodies():
    """SSEResponse's send loop: the chunks, an error raised by them as one more event, the engine requests
    aborted, then [DONE] and the end of the body."""
    async def chunks(fail: bool):
        yield "data: a\n\n"
        if fail:
            raise RuntimeError("boom")
        yield "data: b\n\n"

    for fail in (False, True):
        aborted, messages = [], []
        engine = SimpleNamespace(abort=aborted.append)

        async def send(message):
            messages.append(message)
        asyncio.run(SSEResponse(engine, ["r-0", "r-1"], chunks(fail)).stream_response(send))
        assert messages[0]["type"] == "http.response.start" and messages[0]["status"] == 200
        assert (b"content-type", b"text/event-stream; charset=utf-8") in messages[0]["headers"]
        error = sse({"error": {"message": "boom", "type": "server_error", "param": None, "code": None}})
        assert [m["body"] for m in messages[1:]] == [b"data: a\n\n", (error if fail else "data: b\n\n").encode(),
                                                     b"data: [DONE]\n\n", b""]
        assert [m["more_body"] for m in messages[1:]] == [True, True, True, False]
        assert aborted == ["r-0", "r-1"]


def test_continuous_usage_stats_put_each_choices_usage_in_its_chunks():
    """vLLM's stream_options.continuous_usage_stats (with include_usage): every chunk carries the usage of its
    choice so far (its prompt's tokens, the choice's tokens); the last chunk is the whole request's usage."""
    options = {"include_usage": True, "continuous_usage_stats": True}
    for n in (1, 2):
        for plain in (True, False):
            req = CompletionRequest(prompt=[[1, 2, 3], [4]], n=n, stream=True, stream_options=options,
                                    echo=not plain)
            chunks = _chunks(completions._stream(CTX, req, "cmpl-1", ["p", "q"], 6,
                                                 merge([_stream(_outputs(n, False)) for _ in range(2)]), ["", ""]))
            _check(chunks)
            seen: dict[int, int] = {}
            for chunk in chunks[:-1]:
                obj = json.loads(chunk[6:])
                index = obj["choices"][0]["index"]
                seen[index] = seen.get(index, 0) + 1
                assert obj["usage"] == {"prompt_tokens": 3, "completion_tokens": seen[index], "total_tokens":
                                        3 + seen[index]}
            assert json.loads(chunks[-1][6:])["usage"]["completion_tokens"] == 2 * n * len(TEXTS)
        req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], n=n, stream=True,
                                    stream_options=options)
        chunks = _chunks(chat._stream(CTX, req, plan_tools(req, None, False), "chatcmpl-1", [1, 2, 3],
                                      merge([_stream(_outputs(n, False))]), None, ""))
        _check(chunks)
        usages = [json.loads(c[6:])["usage"]["completion_tokens"] for c in chunks[:-1]]
        assert usages == [0] * n + [step for step in range(1, len(TEXTS) + 1) for _ in range(n)]
        assert json.loads(chunks[-1][6:])["usage"]["completion_tokens"] == n * len(TEXTS)
