"""Hostile input (issue 14, part 2) as a table: each request gets its status, every error is in OpenAI's shape
and short (no echo of what was sent), and afterwards the servers are healthy and answer as before.

Bodies are sent as `json.dumps` writes them: ASCII, a lone surrogate as the escape \\ud800, inf and nan as
Infinity and NaN (Python's json reads them; JSON's 1e309 is also inf).
"""
import asyncio
import json

import httpx
import pytest
from server.server_utils import EDGE_MAX_BODY, MODEL_NAME, Tally, is_openai_error

COMPL, CHAT, TOKENIZE, DETOKENIZE = "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"
MSG = [{"role": "user", "content": "Hi"}]
SUR = "\ud800"   # a lone surrogate
BIG = 2 ** 70
GREEDY = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0}


def case(name, path, body, statuses, param=None, server="edge", method="POST"):
    return pytest.param(server, method, path, body, set(statuses), param, id=name)


def raw(text: str) -> bytes:
    return text.encode()


CASES = [
    # numbers out of every range
    case("seed 2**64", COMPL, {"prompt": "a", "seed": 2 ** 64}, [400], "seed"),
    case("seed -2**63-1", COMPL, {"prompt": "a", "seed": -2 ** 63 - 1}, [400], "seed"),
    case("seed 2**70 greedy", COMPL, {"prompt": "a", "seed": BIG, "temperature": 0}, [400], "seed"),
    case("seed 2**64-1 n=2", COMPL, {"prompt": "a", "seed": 2 ** 64 - 1, "n": 2}, [200]),
    case("top_k 2**63 (above the vocabulary: all)", COMPL, {"prompt": "a", "top_k": 2 ** 63}, [200]),
    case("n 10**6", COMPL, {"prompt": "a", "n": 10 ** 6}, [400], "n"),
    case("n over max_num_seqs (waits for places, as vLLM's)", COMPL, {"prompt": "a", "n": 64, "max_tokens": 1},
         [200]),
    case("temperature 1e309", COMPL, raw(f'{{"model": "{MODEL_NAME}", "prompt": "a", "temperature": 1e309}}'),
         [400], "temperature"),
    case("chat temperature inf", CHAT, {"messages": MSG, "temperature": float("inf")}, [400], "temperature"),
    case("temperature nan", COMPL, {"prompt": "a", "temperature": float("nan")}, [400], "temperature"),
    case("top_p inf", COMPL, {"prompt": "a", "top_p": float("inf")}, [400], "top_p"),
    case("min_p nan", COMPL, {"prompt": "a", "min_p": float("nan")}, [400], "min_p"),
    case("frequency_penalty nan", COMPL, {"prompt": "a", "frequency_penalty": float("nan")}, [400]),
    case("max_tokens 1e309", COMPL, raw(f'{{"model": "{MODEL_NAME}", "prompt": "a", "max_tokens": 1e309}}'),
         [400], "max_tokens"),
    case("max_tokens 2**63", COMPL, {"prompt": "a", "max_tokens": 2 ** 63}, [400]),
    case("max_tokens -1", COMPL, {"prompt": "a", "max_tokens": -1}, [400]),
    case("logprobs 2**70", COMPL, {"prompt": "a", "logprobs": BIG}, [400], "logprobs"),
    case("top_logprobs 2**70", CHAT, {"messages": MSG, "logprobs": True, "top_logprobs": BIG}, [400]),
    case("min_tokens 2**70", COMPL, {"prompt": "a", "min_tokens": BIG}, [400], "min_tokens"),
    case("stop_token_ids 2**70", COMPL, {"prompt": "a", "stop_token_ids": [BIG]}, [400], "stop_token_ids"),
    case("prompt id 2**70", COMPL, {"prompt": [BIG]}, [400]),
    case("prompt id -1", COMPL, {"prompt": [-1]}, [400]),
    case("prompt [[]]", COMPL, {"prompt": [[]]}, [400]),
    case("detokenize 2**70", DETOKENIZE, {"tokens": [BIG]}, [400], "tokens"),
    case("detokenize -1", DETOKENIZE, {"tokens": [-1]}, [400], "tokens"),
    # lone surrogates, wherever text is taken
    case("surrogate prompt", COMPL, {"prompt": SUR}, [400], "prompt"),
    case("surrogate prompt list", COMPL, {"prompt": ["ok", "a" + SUR]}, [400], "prompt.1"),
    case("surrogate chat content", CHAT, {"messages": [{"role": "user", "content": SUR}]}, [400],
         "messages.0.content"),
    case("surrogate chat part", CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": SUR}]}]},
         [400], "messages.0.content.0.text"),
    case("surrogate chat role", CHAT, {"messages": [{"role": SUR, "content": "x"}]}, [400], "messages.0.role"),
    case("surrogate stop", COMPL, {"prompt": "a", "stop": [SUR]}, [400], "stop.0"),
    case("surrogate user", CHAT, {"messages": MSG, "user": SUR}, [400], "user"),
    case("surrogate tokenize", TOKENIZE, {"prompt": SUR}, [400], "prompt"),
    case("surrogate tokenize chat", TOKENIZE, {"messages": [{"role": "user", "content": SUR}]}, [400],
         "messages.0.content"),
    case("surrogate model", COMPL, {"model": SUR, "prompt": "a"}, [404], "model"),
    case("surrogate key", COMPL, {"prompt": "a", SUR: 1}, [400], SUR),
    case("surrogate pair is text", TOKENIZE, {"prompt": "\U0001F600"}, [200]),
    # bodies
    case("body over the limit", COMPL, {"prompt": "a" * EDGE_MAX_BODY}, [413]),
    case("chunked body over the limit", COMPL, [b'{"prompt": "', b"a" * EDGE_MAX_BODY, b'"}'], [413]),
    case("nested 100k", COMPL, raw("[" * 100_000 + "]" * 100_000), [400]),
    case("nested 500 in prompt", COMPL, raw('{"prompt": ' + "[" * 500 + "]" * 500 + "}"), [400]),
    case("non-UTF-8", COMPL, b'{"prompt": "\xff\xfe"}', [400]),
    case("empty body", COMPL, b"", [400]),
    case("list body", COMPL, [1, 2], [400]),
    case("string body", COMPL, "text", [400]),
    case("null body", COMPL, None, [400]),
    case("no prompt", COMPL, {}, [400], "prompt"),
    case("5 MB stop string, invalid", COMPL, {"prompt": "a", "stop": ["x" * 5_000_000, ""]}, [400], "stop",
         server="main"),
    case("5 MB stop string", COMPL, {"prompt": "a", "stop": "x" * 5_000_000, "max_tokens": 2}, [200],
         server="main"),
    case("500 kB model name", COMPL, {"model": "m" * 500_000, "prompt": "a"}, [404], "model"),
    # wrong types
    case("prompt int", COMPL, {"prompt": 5}, [400]),
    case("prompt dict", COMPL, {"prompt": {"a": 1}}, [400]),
    case("prompt mixed ids", COMPL, {"prompt": [[1, "a"]]}, [400]),
    case("messages str", CHAT, {"messages": "hi"}, [400], "messages"),
    case("role int", CHAT, {"messages": [{"role": 5, "content": "x"}]}, [400]),
    case("content int", CHAT, {"messages": [{"role": "user", "content": 5}]}, [400]),
    case("n str", COMPL, {"prompt": "a", "n": "two"}, [400], "n"),
    case("n float", COMPL, {"prompt": "a", "n": 1.5}, [400], "n"),
    case("stream str", COMPL, {"prompt": "a", "stream": "maybe"}, [400], "stream"),
    case("stop int", COMPL, {"prompt": "a", "stop": 5}, [400]),
    case("temperature str", CHAT, {"messages": MSG, "temperature": "hot"}, [400], "temperature"),
    case("max_tokens list", COMPL, {"prompt": "a", "max_tokens": []}, [400], "max_tokens"),
    case("stream_options int", COMPL, {"prompt": "a", "stream_options": 3}, [400], "stream_options"),
    case("seed str", COMPL, {"prompt": "a", "seed": "x"}, [400], "seed"),
    case("tokenize prompt int", TOKENIZE, {"prompt": 5}, [400], "prompt"),
    case("tokenize both", TOKENIZE, {"prompt": "a", "messages": MSG}, [400]),
    case("tokenize neither", TOKENIZE, {}, [400]),
    case("detokenize str", DETOKENIZE, {"tokens": "abc"}, [400], "tokens"),
    # routes and methods
    case("unknown route", "/v2/completions", {"prompt": "a"}, [404]),
    case("GET completions", COMPL, None, [405], method="GET"),
    case("DELETE chat", CHAT, None, [405], method="DELETE"),
    case("POST health", "/health", None, [405]),
]


@pytest.fixture(scope="module")
def tally() -> Tally:
    return Tally("hostile table")


@pytest.fixture(scope="module")
def greedy_before(servers) -> dict[str, str]:
    """Each server's greedy answer before any hostile request."""
    return {name: _greedy(servers[name]) for name in ("main", "edge")}


def _greedy(server) -> str:
    r = httpx.post(server.url + COMPL, json=GREEDY, headers=server.headers, verify=server.verify, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _send(server, method: str, path: str, body) -> httpx.Response:
    if isinstance(body, dict) and "model" not in body:
        body = {"model": MODEL_NAME, **body}
    content = (iter(body) if isinstance(body, list) and body and isinstance(body[0], bytes)   # chunked
               else body if isinstance(body, bytes) else None if method != "POST" else json.dumps(body).encode())
    headers = {**server.headers, "content-type": "application/json"}
    return httpx.request(method, server.url + path, content=content, headers=headers, verify=server.verify,
                         timeout=60)


@pytest.mark.parametrize("server_name,method,path,body,statuses,param", CASES)
def test_hostile_request(servers, greedy_before, tally, server_name, method, path, body, statuses, param):
    r = _send(servers[server_name], method, path, body)
    tally.record(r.status_code, is_openai_error(r), f"{method} {path} {str(body)[:100]}")
    assert r.status_code in statuses, r.text[:1000]
    if r.status_code >= 400:
        assert is_openai_error(r), r.text[:1000]
        assert len(r.content) < 2000, f"{len(r.content)} bytes: {r.text[:300]}"   # no echo of what was sent
        assert param is None or r.json()["error"]["param"] == param, r.text[:1000]


def test_health_answers_while_a_long_text_is_tokenized(server, offline_llm):
    """The tokenizer runs on its own thread: /health keeps answering during a 1.9 MB /tokenize (~2 s of
    tokenizing; on the event loop /health answered once, when it was over), and the ids are the same."""
    text = "Once upon a time, there was a little girl named Lily. " * 35_000

    async def go():
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=120) as client:
            big = asyncio.create_task(client.post(TOKENIZE, json={"model": MODEL_NAME, "prompt": text}))
            answered = 0
            while not big.done():
                assert (await client.get("/health")).status_code == 200
                answered += not big.done()
                await asyncio.sleep(0.01)
            return await big, answered
    r, answered = asyncio.run(go())
    assert r.status_code == 200 and r.json()["tokens"] == offline_llm.get_tokenizer().encode(text)
    assert answered >= 10, answered


def test_servers_healthy_and_unchanged_afterwards(servers, greedy_before, tally, capsys, tmp_path_factory):
    for name, text in greedy_before.items():
        server = servers[name]
        assert httpx.get(server.url + "/health", verify=server.verify).status_code == 200
        assert _greedy(server) == text
    with open(servers["edge"].log_path) as f:   # every hostile request was answered, none raised
        assert "Traceback" not in f.read()
    summary = tally.summary()
    (tmp_path_factory.getbasetemp() / "hostile_table_summary.json").write_text(json.dumps(summary, indent=1))
    with capsys.disabled():
        print(f"\nFUZZ SUMMARY {json.dumps(summary)}")
    assert summary["5xx"] == 0 and summary["wrongly_shaped"] == 0, summary
