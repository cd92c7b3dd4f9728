"""vLLM's request fields for clients that work in token ids, and for tenants that share a server:
- return_token_ids: the prompt's token ids and each choice's beside the text, whole or streamed (the prompt's
  with a choice's first chunk, each chunk its new ids: joined, the whole); also with a tool parser that holds
  text back, and with a truncated prompt (the ids the engine ran, and the usage that counts them);
- return_tokens_as_token_ids (and the server's flag): logprobs name tokens by id;
- cache_salt: cached blocks are shared only by requests of the same salt."""
import json
import time

import httpx
from server.server_utils import MODEL_NAME

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
PROMPT = "Once upon a time"
MESSAGES = [{"role": "user", "content": "Tell me a story"}]


def _post(server, path, body):
    r = httpx.post(server.url + path, json={"model": MODEL_NAME, **body}, headers=server.headers, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _chunks(server, path, body) -> list[dict]:
    with httpx.stream("POST", server.url + path, json={"model": MODEL_NAME, **body, "stream": True},
                      headers=server.headers, timeout=60) as r:
        assert r.status_code == 200
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]


def _tokenize(server, **body) -> list[int]:
    return httpx.post(server.url + "/tokenize", json=body, headers=server.headers, timeout=60).json()["tokens"]


def test_completions_return_token_ids(server):
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "n": 2, "seed": 3, "return_token_ids": True,
            "stream_options": None}
    prompt_ids = _tokenize(server, prompt=PROMPT)
    whole = _post(server, COMPLETIONS, body)
    plain = _post(server, COMPLETIONS, {**body, "return_token_ids": False})
    for w, p in zip(whole["choices"], plain["choices"], strict=True):
        assert w["prompt_token_ids"] == prompt_ids and len(w["token_ids"]) == whole["usage"]["completion_tokens"] // 2
        assert w["text"] == p["text"] and p["token_ids"] is None and p["prompt_token_ids"] is None
    joined, firsts = {}, {}
    for chunk in _chunks(server, COMPLETIONS, {**body, "echo": True, "stream_options": {"include_usage": True}}):
        for c in chunk["choices"]:
            joined[c["index"]] = joined.get(c["index"], []) + c["token_ids"]
            firsts.setdefault(c["index"], c["prompt_token_ids"])
            assert c["prompt_token_ids"] in (None, prompt_ids)
    assert firsts == {0: prompt_ids, 1: prompt_ids}
    assert joined == {c["index"]: c["token_ids"] for c in whole["choices"]}
    # a truncated prompt: the ids the engine ran, and the streamed usage counts them. A text is truncated as
    # vLLM's tokenizer truncates it: its BOS stays, then the last token
    short = {"prompt": PROMPT, "max_tokens": 2, "truncate_prompt_tokens": 2, "return_token_ids": True}
    assert _post(server, COMPLETIONS, short)["choices"][0]["prompt_token_ids"] == prompt_ids[:1] + prompt_ids[-1:]
    assert _post(server, COMPLETIONS, {**short, "prompt": prompt_ids})["choices"][0]["prompt_token_ids"] == \
        prompt_ids[-2:]   # token ids: as given
    usage = [c["usage"] for c in _chunks(server, COMPLETIONS, {**short, "stream_options": {"include_usage": True}})
             if c.get("usage")]
    assert usage[-1]["prompt_tokens"] == 2


def test_chat_return_token_ids(server):
    body = {"messages": MESSAGES, "max_tokens": 8, "temperature": 0, "return_token_ids": True}
    prompt_ids = _tokenize(server, messages=MESSAGES)
    whole = _post(server, CHAT, body)
    assert whole["prompt_token_ids"] == prompt_ids
    [choice] = whole["choices"]
    assert len(choice["token_ids"]) == whole["usage"]["completion_tokens"]
    chunks = _chunks(server, CHAT, body)
    assert chunks[0]["prompt_token_ids"] == prompt_ids and "prompt_token_ids" not in chunks[1]
    assert [t for ch in chunks for c in ch["choices"] for t in c.get("token_ids", [])] == choice["token_ids"]
    # a tool parser holds text back while it might be a call: no id is lost from the stream
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with_tools = {**body, "tools": tools, "tool_choice": "auto", "max_tokens": 12}
    ref = _post(server, CHAT, with_tools)["choices"][0]["token_ids"]
    streamed = _chunks(server, CHAT, with_tools)
    assert [t for ch in streamed for c in ch["choices"] for t in c.get("token_ids", [])] == ref


def test_return_tokens_as_token_ids_names_logprob_tokens_by_id(server):
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 2, "echo": True,
            "return_token_ids": True}
    plain = _post(server, COMPLETIONS, body)["choices"][0]
    [c] = _post(server, COMPLETIONS, {**body, "return_tokens_as_token_ids": True})["choices"]
    ids = c["prompt_token_ids"] + c["token_ids"]
    assert c["logprobs"]["tokens"] == [f"token_id:{t}" for t in ids]
    assert c["logprobs"]["token_logprobs"] == plain["logprobs"]["token_logprobs"] and c["text"] == plain["text"]
    for top in c["logprobs"]["top_logprobs"][1:]:
        assert top and all(k.startswith("token_id:") for k in top)
    chat = {"messages": MESSAGES, "max_tokens": 6, "temperature": 0, "logprobs": True, "top_logprobs": 2,
            "return_token_ids": True, "return_tokens_as_token_ids": True}
    [cc] = _post(server, CHAT, chat)["choices"]
    content = cc["logprobs"]["content"]
    assert [e["token"] for e in content] == [f"token_id:{t}" for t in cc["token_ids"]]
    assert all(len(e["top_logprobs"]) == 2 and e["top_logprobs"][0]["token"].startswith("token_id:") for e in content)
    streamed = [e["token"] for ch in _chunks(server, CHAT, chat) for c in ch["choices"]
                for e in (c.get("logprobs") or {}).get("content", [])]
    assert streamed == [e["token"] for e in content]


def test_the_server_flag_sets_the_default_and_a_request_overrides_it(servers):
    small = servers["small"]   # --return-tokens-as-token-ids
    body = {"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "logprobs": 0, "return_token_ids": True}
    [c] = _post(small, COMPLETIONS, body)["choices"]
    assert c["logprobs"]["tokens"] == [f"token_id:{t}" for t in c["token_ids"]]
    [c] = _post(small, COMPLETIONS, {**body, "return_tokens_as_token_ids": False})["choices"]
    assert not any(t.startswith("token_id:") for t in c["logprobs"]["tokens"])


def test_cache_salt_keeps_cached_blocks_to_requests_of_the_same_salt(server):
    from server.server_utils import engine_metrics
    prompt = [(37 * i) % 400 + 7 for i in range(48)]   # three full blocks of 16, unseen by other tests

    def hits_after(**extra) -> float:
        before = engine_metrics(server)
        _post(server, COMPLETIONS, {"prompt": prompt, "max_tokens": 1, **extra})
        for _ in range(100):   # the step's stats reach /metrics just after the response
            now = engine_metrics(server)
            if now["pagedllm:prefix_cache_queries_total"] > before["pagedllm:prefix_cache_queries_total"]:
                return now["pagedllm:prefix_cache_hits_total"] - before["pagedllm:prefix_cache_hits_total"]
            time.sleep(0.05)
        raise AssertionError("no prefix-cache lookup seen")

    assert hits_after(cache_salt="alice") == 0
    assert hits_after(cache_salt="bob") == 0
    assert hits_after() == 0
    assert hits_after(cache_salt="alice") >= 32
    assert hits_after() >= 32
    r = httpx.post(server.url + COMPLETIONS, json={"model": MODEL_NAME, "prompt": "a", "cache_salt": ""},
                   headers=server.headers, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt"
