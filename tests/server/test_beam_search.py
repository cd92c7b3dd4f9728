"""use_beam_search (n = beam width, length_penalty) and best_of through the openai client: the server's beams are
LLM.beam_search's, best_of returns n choices; fields beam search would not use are 400s naming them."""
import json

import httpx
import openai
import pytest
from server.server_utils import MODEL_NAME, wait_all_blocks_free

from pagedllm import BeamSearchParams

PROMPT = "Once upon a time"
MESSAGES = [{"role": "user", "content": "Tell me a story"}]


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0)


def _expected(offline_llm, prompt_ids, k, lp, max_tokens):
    out = offline_llm.beam_search([prompt_ids], BeamSearchParams(beam_width=k, max_tokens=max_tokens,
                                                                 length_penalty=lp))[0]
    tok = offline_llm.get_tokenizer()
    head = tok.decode(prompt_ids)   # the output's text as it reads after the prompt (its leading space kept)
    texts = [tok.decode(s.tokens[:-1] if s.finish_reason == "stop" else s.tokens) for s in out.sequences]
    assert all(t.startswith(head) for t in texts)
    return [(t[len(head):], s.finish_reason) for t, s in zip(texts, out.sequences)]


@pytest.mark.parametrize("lp", [1.0, 0.5])
def test_completions_beam_search_matches_offline(client, offline_llm, lp):
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, n=3, max_tokens=10,
                                  extra_body={"use_beam_search": True, "length_penalty": lp})
    ids = offline_llm.get_tokenizer().encode(PROMPT)
    assert [(c.text, c.finish_reason) for c in r.choices] == _expected(offline_llm, ids, 3, lp, 10)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.prompt_tokens == len(ids)


def test_chat_beam_search_and_stream(client, server, offline_llm):
    r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, n=2, max_tokens=8,
                                       extra_body={"use_beam_search": True})
    ids = httpx.post(server.url + "/tokenize", json={"messages": MESSAGES}, headers=server.headers).json()["tokens"]
    expected = _expected(offline_llm, ids, 2, 1.0, 8)
    assert [(c.message.content, c.finish_reason) for c in r.choices] == expected
    # streamed: the whole result at the end, in chunks of OpenAI's shape
    texts = {}
    for chunk in client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, n=2, max_tokens=8,
                                                stream=True, extra_body={"use_beam_search": True}):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
    assert [texts[0], texts[1]] == [t for t, _ in expected]


def test_beam_search_logprobs_are_the_searchs(server, offline_llm):
    """vLLM's beam search answers logprobs (it was a 400 here): each generated token's logprob and its step's top
    ones, the chosen token first, as LLM.beam_search's sequences hold them; chat's top_logprobs alike."""
    ids = offline_llm.get_tokenizer().encode(PROMPT)
    ref = offline_llm.beam_search([ids], BeamSearchParams(beam_width=3, max_tokens=6))[0].sequences
    body = {"model": MODEL_NAME, "prompt": PROMPT, "n": 3, "max_tokens": 6, "use_beam_search": True,
            "return_tokens_as_token_ids": True}
    r = httpx.post(server.url + "/v1/completions", headers=server.headers, timeout=60, json={**body, "logprobs": 2})
    assert r.status_code == 200, r.text
    for choice, seq in zip(r.json()["choices"], ref):
        generated = seq.tokens[len(ids):]
        lp = choice["logprobs"]
        assert lp["tokens"] == [f"token_id:{t}" for t in generated]
        assert all(abs(a - pos[t].logprob) < 1e-4 for a, t, pos in zip(lp["token_logprobs"], generated, seq.logprobs))
        for top, t, pos in zip(lp["top_logprobs"], generated, seq.logprobs):
            assert set(top) == {f"token_id:{i}" for i in list(pos)[:3]} and f"token_id:{t}" in top
    assert abs(sum(r.json()["choices"][0]["logprobs"]["token_logprobs"]) - ref[0].cum_logprob) < 1e-4
    too_many = httpx.post(server.url + "/v1/completions", headers=server.headers, timeout=60,
                          json={**body, "logprobs": 6})   # 2 x 3 tokens a beam: at most 5 beside the chosen one
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "logprobs", too_many.text

    chat = {"model": MODEL_NAME, "messages": MESSAGES, "n": 2, "max_tokens": 5, "use_beam_search": True,
            "logprobs": True, "top_logprobs": 2}
    r = httpx.post(server.url + "/v1/chat/completions", headers=server.headers, timeout=60, json=chat)
    assert r.status_code == 200, r.text
    chat_ids = httpx.post(server.url + "/tokenize", json={"messages": MESSAGES},
                          headers=server.headers).json()["tokens"]
    ref = offline_llm.beam_search([chat_ids], BeamSearchParams(beam_width=2, max_tokens=5))[0].sequences
    for choice, seq in zip(r.json()["choices"], ref):
        content = choice["logprobs"]["content"]
        assert len(content) == len(seq.tokens) - len(chat_ids)
        for c, pos in zip(content, seq.logprobs):
            chosen, second = list(pos.items())[:2]
            assert [t["logprob"] for t in c["top_logprobs"]] == pytest.approx([chosen[1].logprob, second[1].logprob],
                                                                              abs=1e-4)
            assert c["token"] == c["top_logprobs"][0]["token"] != ""
        if choice["finish_reason"] == "length":   # the tokens' texts rebuild the answer, as a sampled one's do
            assert "".join(c["token"] for c in content) == choice["message"]["content"]


def test_best_of_returns_n_choices(client):
    r = client.completions.create(model=MODEL_NAME, prompt=[PROMPT, "Tom"], n=2, max_tokens=6, seed=3,
                                  extra_body={"best_of": 4})
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    streamed = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, n=1, max_tokens=6, seed=3,
                                              stream=True, extra_body={"best_of": 3}))
    assert "".join(c.choices[0].text for c in streamed if c.choices)


@pytest.mark.parametrize("body,param", [
    ({"length_penalty": 0.5}, "length_penalty"),                        # without use_beam_search
    ({"use_beam_search": True, "top_p": 0.5}, "top_p"),
    ({"use_beam_search": True, "logprobs": 2}, "logprobs"),             # n 1: a step ranks 2 tokens a beam
    ({"use_beam_search": True, "n": 2, "logprobs": 1, "echo": True}, "echo"),   # no prompt logprobs
    ({"use_beam_search": True, "n": 2, "logprob_token_ids": [5], "logprobs": 1}, "logprob_token_ids"),
    ({"use_beam_search": True, "prompt_logprobs": 0}, "prompt_logprobs"),
    ({"use_beam_search": True, "stop": ["x"]}, "stop"),
    ({"use_beam_search": True, "skip_special_tokens": False}, "skip_special_tokens"),   # not its default
    ({"use_beam_search": True, "n": 11}, "n"),                          # 2 x 11 top logprobs > 20
    ({"best_of": 1, "n": 2}, "best_of"),
    # a search of no step (it searched up to the end of the context)
    ({"use_beam_search": True, "n": 2, "max_tokens": 0}, "max_tokens"),
    ({"use_beam_search": True, "n": 2, "max_tokens": 0, "echo": True}, "max_tokens"),
])
def test_beam_and_best_of_errors_name_the_field(server, body, param):
    r = httpx.post(server.url + "/v1/completions", headers=server.headers, timeout=60,
                   json={"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    assert json.loads(r.text)["error"]["param"] == param


def test_beam_search_takes_sampling_fields_at_their_defaults(server):
    """A client's sampling fields at their defaults (vLLM's skip_special_tokens true, top_p 1.0, stop [], a seed)
    change nothing in a beam search: the same answer as without them, not a 400."""
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 4, "n": 2, "use_beam_search": True}
    neutral = {"skip_special_tokens": True, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "stop": [], "stop_token_ids": [],
               "presence_penalty": 0.0, "repetition_penalty": 1.0, "logit_bias": {}, "seed": 7}
    plain, with_defaults = (httpx.post(server.url + "/v1/completions", headers=server.headers, timeout=60,
                                       json={**body, **extra}) for extra in ({}, neutral))
    assert with_defaults.status_code == 200, with_defaults.text
    assert [c["text"] for c in with_defaults.json()["choices"]] == [c["text"] for c in plain.json()["choices"]]


def test_beam_search_leaves_no_block_held(client, server):
    """The server's beams fork the held requests of the step before; every hold is released by the end (also
    when the search ends early on EOS)."""
    wait_all_blocks_free(server)
    for n, max_tokens in ((4, 24), (2, 5)):
        client.completions.create(model=MODEL_NAME, prompt=PROMPT, n=n, max_tokens=max_tokens,
                                  extra_body={"use_beam_search": True})
    after = wait_all_blocks_free(server)
    assert after["pagedllm:kv_cache_usage_perc"] == 0.0


def test_beam_search_cancelled_as_its_step_begins_holds_no_block(tiny_model_dirs):
    """A client that leaves just as a beam search step's requests are added (their streams' tasks cancelled
    before they first ran, so the streams never started and aborted nothing): the step's requests are
    aborted and released all the same: no block stays held, no output queue stays behind (was: each such
    search held its last step's blocks for good)."""
    import asyncio

    from pagedllm.config import EngineConfig
    from pagedllm.engine.async_llm import AsyncLLM
    from pagedllm.server.beam_search import beam_search_stream

    async def main():
        engine = AsyncLLM(EngineConfig(tiny_model_dirs["llama"], num_gpu_blocks_override=64, max_model_len=256,
                                       log_stats_interval=0, device="cpu"))
        try:
            params = BeamSearchParams(beam_width=2, max_tokens=20, ignore_eos=True)
            for i in range(3):
                async def consume():
                    async for _ in beam_search_stream(engine, f"search-{i}", [1, 2, 3, 4, 5], params):
                        pass
                task = asyncio.ensure_future(consume())
                await asyncio.sleep(0)   # the search adds its first step's request, then awaits its stream's task
                task.cancel()            # before that task has run
                await asyncio.gather(task, return_exceptions=True)
            await asyncio.sleep(0.5)     # the core has run whatever it still had
            stats = await engine.get_stats()
            assert stats.num_blocks_free == stats.num_blocks_total and stats.num_running == 0
            assert not engine._queues and not engine.output_processor.parents
        finally:
            engine.shutdown()
    asyncio.run(main())
