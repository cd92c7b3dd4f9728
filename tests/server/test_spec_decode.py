"""The "small" server speculates (a draft model): streamed and whole answers equal offline greedy decoding
without speculation, logprobs included, and /metrics carries vLLM's spec_decode counters."""
import json

import httpx

from pagedllm import SamplingParams
from server.server_utils import MODEL_NAME, engine_metrics

PROMPT = "Lily and Ben went to the park. Lily and Ben"


def test_speculating_server_matches_offline(servers, offline_llm):
    small = servers["small"]
    ref = offline_llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=1),
                               use_tqdm=False)[0].outputs[0]
    before = engine_metrics(small)
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 40, "temperature": 0, "ignore_eos": True,
            "logprobs": 1}
    whole = httpx.post(small.url + "/v1/completions", json=body, headers=small.headers, verify=small.verify,
                       timeout=60).json()["choices"][0]
    assert whole["text"] == ref.text
    expected = [next(iter(p.values())).logprob for p in ref.logprobs]
    assert len(whole["logprobs"]["token_logprobs"]) == len(expected)
    assert all(abs(a - b) <= 1e-4 for a, b in zip(whole["logprobs"]["token_logprobs"], expected))
    text = ""
    with httpx.stream("POST", small.url + "/v1/completions", json={**body, "stream": True}, headers=small.headers,
                      verify=small.verify, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text += json.loads(line[6:])["choices"][0]["text"]
    assert text == ref.text
    after = engine_metrics(small)
    assert after["pagedllm:spec_decode_num_drafts_total"] > before.get("pagedllm:spec_decode_num_drafts_total", 0)
    # the model is its own draft: every proposal is accepted
    assert after["pagedllm:spec_decode_num_accepted_tokens_total"] == after[
        "pagedllm:spec_decode_num_draft_tokens_total"] > 0
