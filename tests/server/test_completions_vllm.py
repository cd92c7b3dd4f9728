"""/v1/completions against vLLM 0.26's CompletionRequest and its serving code, field by field: what a request
that vLLM answers gets here too (or a 400 naming the field and why)."""
import json

import httpx
from server.server_utils import MODEL_NAME

COMPLETIONS = "/v1/completions"
PROMPT = "Once upon a time"


def _post(server, body: dict) -> httpx.Response:
    return httpx.post(server.url + COMPLETIONS, json={"model": MODEL_NAME, "prompt": PROMPT, **body},
                      headers=server.headers, timeout=60)


def _ok(server, body: dict) -> dict:
    r = _post(server, body)
    assert r.status_code == 200, r.text
    return r.json()


def _chunks(server, body: dict) -> list[dict]:
    r = _post(server, {**body, "stream": True})
    assert r.status_code == 200, r.text
    return [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]


def test_null_max_tokens_is_16(server):
    """vLLM 0.26 reads max_tokens null as its default, 16 (normalize_null_max_tokens); it ran to the end of the
    context (509 tokens on this server)."""
    usage = _ok(server, {"max_tokens": None, "ignore_eos": True})["usage"]
    assert usage["completion_tokens"] == 16


def test_prompt_logprobs_0_streams(server):
    """vLLM refuses prompt_logprobs with stream only when it is above 0 (or -1): 0 asks for no alternatives, and
    the stream is the one without it (it was a 400). Chat's rule is the same."""
    body = {"max_tokens": 4, "temperature": 0}
    plain = "".join(c["choices"][0]["text"] for c in _chunks(server, body))
    assert "".join(c["choices"][0]["text"] for c in _chunks(server, {**body, "prompt_logprobs": 0})) == plain
    chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "stream": True, **body}
    for extra, status in (({"prompt_logprobs": 0}, 200), ({"prompt_logprobs": 1}, 400)):
        r = httpx.post(server.url + "/v1/chat/completions", json={**chat, **extra}, headers=server.headers,
                       timeout=60)
        assert r.status_code == status, r.text
    r = _post(server, {**body, "stream": True, "prompt_logprobs": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs", r.text


def test_echo_with_logprobs_gives_the_prompt_logprobs_it_ran(server):
    """echo with logprobs N runs the prompt's logprobs at N (prompt_logprobs unset), and vLLM's choice carries
    them, as if prompt_logprobs N had been asked (it carries whatever the engine ran); they were left out."""
    for max_tokens in (3, 0):
        body = {"max_tokens": max_tokens, "temperature": 0, "echo": True, "logprobs": 1}
        got = _ok(server, body)["choices"][0]
        asked = _ok(server, {**body, "prompt_logprobs": 1})["choices"][0]
        assert got["prompt_logprobs"] == asked["prompt_logprobs"] and got["prompt_logprobs"][0] is None
        assert len(got["prompt_logprobs"]) == _ok(server, body)["usage"]["prompt_tokens"]
        assert all(1 <= len(p) <= 2 for p in got["prompt_logprobs"][1:])
    assert _ok(server, {"max_tokens": 2, "echo": True})["choices"][0]["prompt_logprobs"] is None


def test_echoed_prompt_positions_show_logprobs_plus_one_entries_as_vllms(server):
    """vLLM's completion logprobs show the first logprobs + 1 entries of each position (its token, then the top
    ones): with a larger prompt_logprobs an echoed prompt token among the top logprobs shows one more than a
    generated position would. Only the token and the top logprobs were shown."""
    greedy = _ok(server, {"max_tokens": 6, "temperature": 0, "return_token_ids": True})["choices"][0]
    ids = greedy["prompt_token_ids"] + greedy["token_ids"]   # its last 6 tokens are their positions' top ones
    body = {"prompt": ids, "max_tokens": 2, "temperature": 0, "echo": True, "logprobs": 1, "prompt_logprobs": 5}
    choice = _ok(server, {**body, "return_tokens_as_token_ids": True})["choices"][0]
    prompt = choice["prompt_logprobs"]
    shown = choice["logprobs"]["top_logprobs"][1:len(prompt)]
    grew = 0
    for position, top in zip(prompt[1:], shown):
        ids = list(position)
        ranks = [position[i]["rank"] for i in ids[1:]]
        assert ranks == sorted(ranks) and len(ids) >= 5   # the token, then the top 5 (or 6 with it among them)
        assert set(top) == {f"token_id:{i}" for i in ids[:2]}
        grew += position[ids[0]]["rank"] == 1
    assert grew >= 6   # the greedy tokens' positions show 2 entries, not 1


def test_logprob_token_ids_with_echo_alone_is_400(server):
    """logprob_token_ids name logprobs of generated positions; echo with max_tokens 0 generates none: vLLM's 400
    naming the field (the ids were dropped without a word)."""
    r = _post(server, {"max_tokens": 0, "echo": True, "logprobs": 1, "logprob_token_ids": [5]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprob_token_ids", r.text
    assert _post(server, {"max_tokens": 0, "echo": True, "logprobs": 1, "logprob_token_ids": []}).status_code == 200


def test_echo_with_return_token_ids_leaves_the_prompt_text_out(server):
    """vLLM's: with return_token_ids the echo is the prompt's ids (prompt_token_ids), not its text: the choice's
    text is the completion alone, streamed or not; the logprobs still run over the prompt's tokens too."""
    body = {"max_tokens": 3, "temperature": 0, "ignore_eos": True}
    plain = _ok(server, body)["choices"][0]
    both = {**body, "echo": True, "return_token_ids": True, "logprobs": 0}
    got = _ok(server, both)
    choice = got["choices"][0]
    assert choice["text"] == plain["text"] and choice["token_ids"] and choice["prompt_token_ids"]
    assert len(choice["logprobs"]["tokens"]) == got["usage"]["prompt_tokens"] + 3
    assert "".join(c["choices"][0]["text"] for c in _chunks(server, both)) == plain["text"]
    assert _ok(server, {**both, "return_token_ids": False})["choices"][0]["text"].startswith(PROMPT)


def test_truncation_side_given_cuts_the_tokenized_text(server):
    """vLLM truncates a text prompt as its tokenizer does (its BOS stays, then the last k - 1 tokens) only when
    truncation_side is unset; given, it cuts the tokens the tokenizer gave from that side, BOS and all."""
    ids = httpx.post(server.url + "/tokenize", json={"model": MODEL_NAME, "prompt": PROMPT},
                     headers=server.headers, timeout=60).json()["tokens"]
    assert ids[0] == 1 and len(ids) > 3
    body = {"max_tokens": 1, "truncate_prompt_tokens": 3, "return_token_ids": True}
    for side, kept in ((None, ids[:1] + ids[-2:]), ("left", ids[-3:]), ("right", ids[:3])):
        got = _ok(server, {**body, "truncation_side": side})["choices"][0]["prompt_token_ids"]
        assert got == kept, side


def test_echoed_text_prompt_names_its_bos(server):
    """echo + logprobs: the prompt's first token, which has no logprob, is its decoding, special or not, as
    vLLM's (a text prompt's BOS is "<s>", as a token-id prompt's; it was "" for a text prompt), and the offsets
    count it, streamed or not."""
    body = {"max_tokens": 2, "temperature": 0, "echo": True, "logprobs": 0}
    for prompt in (PROMPT, [1, 403, 407]):
        lp = _ok(server, {**body, "prompt": prompt})["choices"][0]["logprobs"]
        assert lp["tokens"][0] == "<s>" and lp["token_logprobs"][0] is None
        lengths = [len(t) for t in lp["tokens"]]
        assert lp["text_offset"] == [sum(lengths[:i]) for i in range(len(lengths))]
        chunks = _chunks(server, {**body, "prompt": prompt})
        assert [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]] == lp["tokens"]


def test_answers_carry_the_system_fingerprint(server):
    """vLLM 0.26 (--fingerprint-mode full, its default) names its set-up in system_fingerprint: answers have it,
    and a stream's choice has it on its last chunk, or only on the usage chunk when one ends the stream. Chat
    alike; one value for the server's every answer."""
    import re
    chat = "/v1/chat/completions"
    got = set()
    for path, body in ((COMPLETIONS, {"prompt": PROMPT}), (chat, {"messages": [{"role": "user", "content": "Hi"}]})):
        body = {"model": MODEL_NAME, "max_tokens": 3, **body}
        answer = httpx.post(server.url + path, json=body, headers=server.headers, timeout=60).json()
        got.add(answer["system_fingerprint"])
        for options, where in (({}, "finish"), ({"stream_options": {"include_usage": True}}, "usage")):
            r = httpx.post(server.url + path, json={**body, "stream": True, **options}, headers=server.headers,
                           timeout=60)
            chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
            stamped = [c for c in chunks if "system_fingerprint" in c]
            if where == "usage":
                assert stamped == [chunks[-1]] and chunks[-1]["choices"] == [], chunks
            else:
                assert stamped == [c for c in chunks if c["choices"][0]["finish_reason"] is not None] == [chunks[-1]]
            got |= {c["system_fingerprint"] for c in stamped}
    [fingerprint] = got
    assert re.fullmatch(r"pagedllm-[0-9.]+-[0-9a-f]{8}", fingerprint), fingerprint


def test_logit_bias_beyond_100_is_clamped(server):
    """vLLM's server clamps each bias into [-100, 100] (SamplingParams.from_optional), so -1e9, a common way to
    ban a token, is -100, and 1e9 is 100: the same answer (it was a 400). Chat alike."""
    body = {"max_tokens": 4, "temperature": 0, "return_token_ids": True}
    for far, edge in ((1e9, 100), (-1e9, -100)):
        got = _ok(server, {**body, "logit_bias": {"300": far}})["choices"][0]["token_ids"]
        assert got == _ok(server, {**body, "logit_bias": {"300": edge}})["choices"][0]["token_ids"]
        assert (set(got) == {300}) == (far > 0)
    chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
            "temperature": 0, "logit_bias": {"300": 1e9}, "return_token_ids": True}
    r = httpx.post(server.url + "/v1/chat/completions", json=chat, headers=server.headers, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == [300] * 3, r.text
