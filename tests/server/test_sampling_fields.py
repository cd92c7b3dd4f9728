"""vLLM's sampling fields on both endpoints (issue 14, part 3): the server's greedy output equals offline
LLM.generate / LLM.chat with the same SamplingParams, and differs from the output without the field.
"""
import json

import httpx
import pytest
from server.server_utils import CHAT_TEMPLATE, MODEL_NAME

from pagedllm import SamplingParams

PROMPTS = ["Once upon a time", "The little dog was", "Tom and Lily went to the park", "One day, a cat"]
MESSAGES = [{"role": "user", "content": "Tell me a story"}]
MAX_TOKENS = 24
TOKEN = 100   # an ordinary token of the demo vocabulary (not BOS/EOS)


def _complete(server, prompt, **fields) -> dict:
    r = httpx.post(server.url + "/v1/completions", headers=server.headers, timeout=60, json={
        "model": MODEL_NAME, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def _offline(offline_llm, prompt, **fields):
    [ref] = offline_llm.generate(prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, **fields),
                                 use_tqdm=False)
    return ref.outputs[0]


@pytest.mark.parametrize("fields", [
    {"repetition_penalty": 1.8},
    {"presence_penalty": 2.0},
    {"frequency_penalty": 2.0},
    {"repetition_penalty": 0.5, "frequency_penalty": -1.0},
])
def test_penalties_match_offline_and_take_effect(server, offline_llm, fields):
    changed = False
    for prompt in PROMPTS:
        got = _complete(server, prompt, **fields)["choices"][0]["text"]
        assert got == _offline(offline_llm, prompt, **fields).text
        changed |= got != _complete(server, prompt)["choices"][0]["text"]
    assert changed, f"{fields} changed no greedy output of {len(PROMPTS)} prompts"


def test_logit_bias_and_allowed_token_ids(server, offline_llm):
    for fields, allowed in (({"logit_bias": {str(TOKEN): 100.0}}, {TOKEN}),
                            ({"allowed_token_ids": [TOKEN, TOKEN + 1]}, {TOKEN, TOKEN + 1})):
        ref = _offline(offline_llm, PROMPTS[0], **fields)
        assert set(ref.token_ids) <= allowed and len(ref.token_ids) == MAX_TOKENS
        out = _complete(server, PROMPTS[0], **fields)
        assert out["choices"][0]["text"] == ref.text
        assert out["choices"][0]["text"] != _complete(server, PROMPTS[0])["choices"][0]["text"]


def test_an_infinite_logit_bias_is_clamped_as_a_huge_one(server):
    """JSON's 1e400 reads as +inf: clamped to 100 as 1e300 is (vLLM's server clamps both); it was a 400."""
    def complete(bias: str) -> str:   # the bias as JSON text: json= cannot send 1e400
        body = {"model": MODEL_NAME, "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0}
        text = json.dumps(body)[:-1] + f', "logit_bias": {{"{TOKEN}": {bias}}}}}'
        r = httpx.post(server.url + "/v1/completions", headers={**server.headers, "content-type": "application/json"},
                       content=text, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]
    assert complete("1e400") == complete("1e300") == complete("100") != complete("0")
    assert complete("-1e400") == complete("-100")


def test_bad_words_ban_a_greedy_word(server, offline_llm):
    """A word that is one token (tokenized as vLLM does, with and without a leading space) is never sampled."""
    tokenizer = offline_llm.get_tokenizer()
    plain = _offline(offline_llm, PROMPTS[0])
    word, banned = next((w, t) for t in plain.token_ids if (w := tokenizer.decode([t]).strip())
                        and [t] in (tokenizer.encode(w, add_special_tokens=False),
                                    tokenizer.encode(" " + w, add_special_tokens=False)))
    ref = _offline(offline_llm, PROMPTS[0], bad_words=[word])
    assert banned not in ref.token_ids and ref.token_ids != plain.token_ids
    assert _complete(server, PROMPTS[0], bad_words=[word])["choices"][0]["text"] == ref.text


def test_truncate_prompt_tokens_keeps_the_last_tokens(server, offline_llm):
    ids = offline_llm.get_tokenizer().encode(" ".join(PROMPTS))
    out = _complete(server, ids, truncate_prompt_tokens=6)
    assert out["usage"]["prompt_tokens"] == 6
    assert out["choices"][0]["text"] == _offline(offline_llm, ids, truncate_prompt_tokens=6).text \
        == _offline(offline_llm, ids[-6:]).text
    assert out["choices"][0]["text"] != _complete(server, ids)["choices"][0]["text"]
    # truncation_side right (vLLM's): the first 6
    right = _complete(server, ids, truncate_prompt_tokens=6, truncation_side="right", return_token_ids=True)
    assert right["choices"][0]["prompt_token_ids"] == ids[:6] and right["usage"]["prompt_tokens"] == 6
    assert right["choices"][0]["text"] == _offline(offline_llm, ids[:6]).text
    bad = httpx.post(server.url + "/v1/completions", headers=server.headers, timeout=30,
                     json={"model": MODEL_NAME, "prompt": ids, "truncation_side": "middle"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "truncation_side", bad.text


def test_chat_takes_the_same_fields(server, offline_llm):
    fields = {"logit_bias": {str(TOKEN): 100.0}, "repetition_penalty": 1.3}
    r = httpx.post(server.url + "/v1/chat/completions", headers=server.headers, timeout=60, json={
        "model": MODEL_NAME, "messages": MESSAGES, "max_tokens": MAX_TOKENS, "temperature": 0, **fields})
    assert r.status_code == 200, r.text
    [ref] = offline_llm.chat(MESSAGES, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, **fields),
                             use_tqdm=False, chat_template=CHAT_TEMPLATE)
    assert r.json()["choices"][0]["message"]["content"] == ref.outputs[0].text
    assert TOKEN in ref.outputs[0].token_ids


def test_repetition_detection_finish_reason(server):
    """vLLM's repetition_detection: finish_reason "repetition" and stop_reason "repetition_detected", streamed
    too; bad parameters are a 400 naming the field."""
    rep = {"allowed_token_ids": [TOKEN], "repetition_detection": {"max_pattern_size": 1, "min_count": 5}}
    choice = _complete(server, PROMPTS[0], return_token_ids=True, **rep)["choices"][0]
    assert (choice["token_ids"], choice["finish_reason"], choice["stop_reason"]) == \
        ([TOKEN] * 5, "repetition", "repetition_detected")
    r = httpx.post(server.url + "/v1/chat/completions", headers=server.headers, timeout=60, json={
        "model": MODEL_NAME, "messages": MESSAGES, "max_tokens": MAX_TOKENS, "stream": True, **rep})
    finishes = [c["finish_reason"] for line in r.text.splitlines() if line.startswith("data: {")
                for c in json.loads(line[6:])["choices"] if c["finish_reason"]]
    assert finishes == ["repetition"], r.text
    bad = httpx.post(server.url + "/v1/completions", headers=server.headers, timeout=60, json={
        "model": MODEL_NAME, "prompt": "hi", "repetition_detection": {"max_pattern_size": 2, "min_count": 1}})
    assert bad.status_code == 400 and "repetition_detection" in bad.text, bad.text
