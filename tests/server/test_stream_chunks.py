"""A streamed chunk carries one engine step's tokens (vLLM's semantics), or with --stream-interval N, N tokens
(the first token alone, at once, and the rest of the last); text and token counts equal the non-streamed answer.

Tokens per chunk are read from completions' logprobs (one entry a token). The session's "main" server streams
with the default interval, its "small" one speculates (the model as its own draft: every proposal accepted, 4
tokens a step); one more server here has --stream-interval 4."""
import json

import httpx
import pytest

from pagedllm.config import EngineConfig
from server.server_utils import MODEL_NAME, start_server, stop_server, wait_healthy

PROMPT = "Lily and Ben went to the park. Lily and Ben"
MAX_TOKENS = 23


@pytest.fixture(scope="module")
def interval4(tiny_model_dirs, tmp_path_factory):
    log = tmp_path_factory.mktemp("stream_logs") / "interval4.log"
    server = start_server(tiny_model_dirs["llama"], str(log), None, "--stream-interval", "4")
    try:
        wait_healthy(server)
        yield server
    finally:
        stop_server(server)


def _complete(server, stream: bool, **extra) -> tuple[list[tuple[int, str]], dict]:
    """[(tokens, text)] of each chunk with a choice (one item when not streamed), and the usage."""
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "logprobs": 0, **extra}
    if not stream:
        out = httpx.post(server.url + "/v1/completions", json=body, headers=server.headers, timeout=60).json()
        choice = out["choices"][0]
        return [(len(choice["logprobs"]["tokens"]), choice["text"])], out["usage"]
    chunks, usage = [], None
    with httpx.stream("POST", server.url + "/v1/completions", headers=server.headers, timeout=60,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"]:
                choice = chunk["choices"][0]
                chunks.append((len(choice["logprobs"]["tokens"]), choice["text"]))
            if chunk.get("usage"):
                usage = chunk["usage"]
    return chunks, usage


def _same_as_whole(server, chunks, usage):
    [(num_tokens, text)], whole_usage = _complete(server, stream=False)
    assert "".join(t for _, t in chunks) == text
    assert sum(n for n, _ in chunks) == num_tokens == usage["completion_tokens"] == whole_usage["completion_tokens"]


def test_default_streams_one_chunk_per_step(server):
    chunks, usage = _complete(server, stream=True)
    assert [n for n, _ in chunks] == [1] * MAX_TOKENS   # plain decoding: a step is one token
    _same_as_whole(server, chunks, usage)


def test_stream_interval_sends_every_n_tokens(interval4):
    chunks, usage = _complete(interval4, stream=True)
    # the first token at once (time to first token), then 4 at a time, the rest with the finish
    assert [n for n, _ in chunks] == [1, 4, 4, 4, 4, 4, 2]
    _same_as_whole(interval4, chunks, usage)


def test_speculative_step_is_one_chunk(servers):
    server = servers["small"]
    chunks, usage = _complete(server, stream=True)
    sizes = [n for n, _ in chunks]
    assert max(sizes) == 4 and all(1 <= n <= 4 for n in sizes), sizes   # a step's accepted tokens together
    _same_as_whole(server, chunks, usage)


def test_stream_interval_must_be_positive():
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="stream_interval must be an integer"):
            EngineConfig(stream_interval=bad)
