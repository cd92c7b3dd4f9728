"""The OpenAI-compatible server, through the official `openai` client, against offline LLM.generate."""
import asyncio

import httpx
import openai
import pytest
from server.server_utils import CHAT_TEMPLATE, MODEL_NAME, stream_text, wait_all_blocks_free

from pagedllm import SamplingParams

PROMPTS = ["Once upon a time", "The little dog was", "Tom and Lily went to the park", "One day, a cat"]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0)


def test_completions_match_offline_streamed_or_not(client, offline_llm):
    kw = dict(model=MODEL_NAME, max_tokens=20, temperature=0.8, top_p=0.95, n=2)
    for seed, prompt in enumerate(PROMPTS):
        full = client.completions.create(prompt=prompt, seed=seed, **kw)
        texts, reasons, usage = stream_text(client.completions.create(
            prompt=prompt, seed=seed, stream=True, stream_options={"include_usage": True}, **kw))
        [ref] = offline_llm.generate(prompt, SamplingParams(max_tokens=20, temperature=0.8, top_p=0.95, n=2,
                                                            seed=seed), use_tqdm=False)
        assert [c.text for c in full.choices] == [c.text for c in ref.outputs] == [texts[0], texts[1]]
        assert ([c.finish_reason for c in full.choices] == [reasons[0], reasons[1]]
                == [c.finish_reason for c in ref.outputs])
        num_out = sum(len(c.token_ids) for c in ref.outputs)
        assert full.usage.prompt_tokens == usage.prompt_tokens == len(ref.prompt_token_ids)
        assert full.usage.completion_tokens == usage.completion_tokens == num_out
        assert full.usage.total_tokens == len(ref.prompt_token_ids) + num_out


def test_completions_token_ids_list_prompts_stop_and_echo(client, offline_llm):
    prompts = [offline_llm.get_tokenizer().encode(p) for p in PROMPTS[:2]]
    out = client.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=30, temperature=0, stop=[" the"],
                                    echo=True)
    refs = offline_llm.generate(prompts, SamplingParams(max_tokens=30, temperature=0, stop=[" the"]),
                                use_tqdm=False)
    tokenizer = offline_llm.get_tokenizer()
    for choice, ref, ids in zip(out.choices, refs, prompts):
        assert choice.text == tokenizer.decode(ids) + ref.outputs[0].text
        assert choice.finish_reason == ref.outputs[0].finish_reason
    assert any(c.finish_reason == "stop" for c in out.choices), "the stop string never matched: pick another"


def test_streamed_list_of_prompts_with_echo_and_logprobs_equals_non_streamed(client, offline_llm):
    kw = dict(model=MODEL_NAME, prompt=PROMPTS[:3], max_tokens=10, temperature=1.0, seed=11, n=2, echo=True,
              logprobs=1)
    full = client.completions.create(**kw)
    texts, reasons, usage = stream_text(client.completions.create(stream=True, stream_options={"include_usage": True},
                                                                    **kw))
    assert sorted(texts) == [c.index for c in full.choices] == list(range(6))
    assert [texts[c.index] for c in full.choices] == [c.text for c in full.choices]
    assert all(c.text.startswith(PROMPTS[c.index // 2]) for c in full.choices)
    assert [reasons[c.index] for c in full.choices] == [c.finish_reason for c in full.choices]
    assert (usage.prompt_tokens, usage.completion_tokens) == (full.usage.prompt_tokens, full.usage.completion_tokens)
    for c in full.choices:   # echo + logprobs: the prompt's tokens first, the first one without a logprob
        assert c.logprobs.token_logprobs[0] is None
        num_prompt = len(offline_llm.get_tokenizer().encode(PROMPTS[c.index // 2]))
        assert len(c.logprobs.token_logprobs) == len(c.logprobs.tokens) == num_prompt + 10
        assert all(lp is not None for lp in c.logprobs.token_logprobs[1:])


def test_echo_with_max_tokens_0_scores_the_prompt_alone(client):
    """vLLM's echo + max_tokens 0 (lm-eval's loglikelihood requests): each choice is the prompt and its token
    logprobs, nothing generated, streamed or not; the logprobs are those an echo with a token generated has."""
    kw = dict(model=MODEL_NAME, prompt=PROMPTS[:2], echo=True, logprobs=2, temperature=0)
    full = client.completions.create(max_tokens=0, **kw)
    texts, reasons, usage = stream_text(client.completions.create(max_tokens=0, stream=True,
                                                                    stream_options={"include_usage": True}, **kw))
    one = client.completions.create(max_tokens=1, **kw)
    assert [c.text for c in full.choices] == PROMPTS[:2] == [texts[0], texts[1]]
    assert [c.finish_reason for c in full.choices] == ["length", "length"] == [reasons[0], reasons[1]]
    assert full.usage.completion_tokens == usage.completion_tokens == 0
    assert full.usage.prompt_tokens == usage.prompt_tokens == one.usage.prompt_tokens
    for c, ref in zip(full.choices, one.choices):
        assert c.logprobs.tokens == ref.logprobs.tokens[:-1] and c.logprobs.token_logprobs[0] is None
        assert c.logprobs.token_logprobs == ref.logprobs.token_logprobs[:-1]
    for min_tokens in (1, 2):   # nothing is generated: a min_tokens is a 400 naming it (1 was accepted and void)
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(max_tokens=0, extra_body={"min_tokens": min_tokens}, **kw)
        assert e.value.body["param"] == "min_tokens" and "max_tokens 0" in e.value.body["message"]


def test_echoed_prompt_top_logprobs_are_logprobs_many_whatever_prompt_logprobs(client):
    """echo + logprobs N with a larger prompt_logprobs: the echoed prompt tokens' top_logprobs hold the token and
    the top N, as the generated ones and vLLM's (were the prompt_logprobs' top M); prompt_logprobs keeps its M."""
    kw = dict(model=MODEL_NAME, prompt=PROMPTS[0], echo=True, logprobs=1, max_tokens=2, temperature=0)
    plain = client.completions.create(**kw).choices[0]
    both = client.completions.create(extra_body={"prompt_logprobs": 4}, **kw).choices[0]
    for got, want in zip(both.logprobs.top_logprobs, plain.logprobs.top_logprobs, strict=True):
        assert got == (None if want is None else pytest.approx(want, abs=1e-4))
    assert all(len(top) <= 2 and token in top
               for token, top in zip(both.logprobs.tokens, both.logprobs.top_logprobs) if top is not None)
    assert max(len(position) for position in both.model_extra["prompt_logprobs"][1:]) == 5


def test_echoed_prompt_tokens_rebuild_the_echo(client, offline_llm):
    """echo + logprobs: the prompt's first token has no logprob, but keeps its text (was: always "", so a prompt
    that does not start with BOS lost its first word from the tokens and every text offset after it was off):
    token-id prompts (the echo their decoding, BOS as "<s>") and text without BOS (add_special_tokens false)."""
    ids = offline_llm.get_tokenizer().encode("Once upon a time", add_special_tokens=False)
    for prompt, extra in ((ids, {}), (ids[1:], {}), ("Once upon a time", {"add_special_tokens": False})):
        kw = dict(model=MODEL_NAME, prompt=prompt, echo=True, logprobs=1, temperature=0, extra_body=extra)
        full = client.completions.create(max_tokens=0, **kw).choices[0]   # the prompt alone
        lp = full.logprobs
        assert lp.token_logprobs[0] is None and lp.tokens[0] != ""
        assert "".join(lp.tokens) == full.text
        assert [full.text[o:o + len(t)] for t, o in zip(lp.tokens, lp.text_offset)] == lp.tokens
        for max_tokens in (0, 3):   # the same prompt tokens before any generated ones, streamed or not
            more = client.completions.create(max_tokens=max_tokens, **kw).choices[0].logprobs.tokens
            streamed = [c.choices[0].logprobs.tokens for c in client.completions.create(
                max_tokens=max_tokens, stream=True, **kw) if c.choices]
            assert more[:len(lp.tokens)] == sum(streamed, [])[:len(lp.tokens)] == lp.tokens


def test_logprob_tokens_rebuild_the_text_with_their_spaces(client, offline_llm):
    """SentencePiece tokens keep their leading space in logprobs (decoded alone, " loved" read "loved"): with
    only spaced word tokens allowed, the tokens join to the text and each offset points at its token."""
    tok = offline_llm.get_tokenizer()
    words = [ids[0] for ids in (tok.encode(" " + w, add_special_tokens=False) for w in "Once upon a time she to the"
                                .split()) if len(ids) == 1]   # each a single spaced token ("▁the")
    assert len(words) >= 4
    out = client.completions.create(model=MODEL_NAME, prompt="Once", max_tokens=12, temperature=1.0, seed=3,
                                    logprobs=3, extra_body={"allowed_token_ids": words})
    c = out.choices[0]
    assert "".join(c.logprobs.tokens) == c.text and c.text.startswith(" ") and c.text.count(" ") == 12
    for token, offset in zip(c.logprobs.tokens, c.logprobs.text_offset):
        assert c.text[offset:offset + len(token)] == token


def test_completion_logprobs_match_offline(client, offline_llm):
    out = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=8, temperature=0, logprobs=3)
    [ref] = offline_llm.generate(PROMPTS[0], SamplingParams(max_tokens=8, temperature=0, logprobs=3),
                                 use_tqdm=False)
    lp, ref_c = out.choices[0].logprobs, ref.outputs[0]
    assert len(lp.token_logprobs) == len(ref_c.token_ids) == 8
    for got, top, tid, position in zip(lp.token_logprobs, lp.top_logprobs, ref_c.token_ids, ref_c.logprobs):
        assert got == pytest.approx(position[tid].logprob, abs=1e-4)
        # Keyed by token text, as OpenAI's: tokens with the same text (e.g. byte pieces) collapse.
        assert 1 <= len(top) <= 4
        assert max(top.values()) == pytest.approx(max(p.logprob for p in position.values()), abs=1e-4)


def test_chat_matches_offline_streamed_or_not(client, offline_llm):
    messages = [{"role": "user", "content": "Tell me a story"}]
    kw = dict(model=MODEL_NAME, messages=messages, max_completion_tokens=16, temperature=1.0, seed=3, n=2)
    full = client.chat.completions.create(**kw)
    texts, reasons, usage = stream_text(client.chat.completions.create(
        stream=True, stream_options={"include_usage": True}, **kw))
    [ref] = offline_llm.chat(messages, SamplingParams(max_tokens=16, temperature=1.0, seed=3, n=2), use_tqdm=False,
                             chat_template=CHAT_TEMPLATE)
    assert [c.message.content for c in full.choices] == [c.text for c in ref.outputs] == [texts[0], texts[1]]
    assert all(c.message.role == "assistant" for c in full.choices)
    assert full.usage.prompt_tokens == usage.prompt_tokens == len(ref.prompt_token_ids)
    assert full.usage.completion_tokens == usage.completion_tokens == 32


def test_chat_logprobs(client, offline_llm):
    messages = [{"role": "user", "content": "Hi"}]
    out = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=5, temperature=0,
                                         logprobs=True, top_logprobs=2)
    [ref] = offline_llm.chat(messages, SamplingParams(max_tokens=5, temperature=0, logprobs=2), use_tqdm=False,
                             chat_template=CHAT_TEMPLATE)
    content = out.choices[0].logprobs.content
    assert len(content) == 5
    for entry, tid, position in zip(content, ref.outputs[0].token_ids, ref.outputs[0].logprobs):
        assert entry.logprob == pytest.approx(position[tid].logprob, abs=1e-4)
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)   # greedy: top-1


def test_models_tokenize_detokenize_health_version(server, offline_llm):
    h = server.headers
    models = httpx.get(server.url + "/v1/models", headers=h).json()
    assert models["data"][0]["id"] == MODEL_NAME and models["data"][0]["max_model_len"] == 512
    ids = offline_llm.get_tokenizer().encode(PROMPTS[2])
    tok = httpx.post(server.url + "/tokenize", json={"prompt": PROMPTS[2]}, headers=h).json()
    assert tok["tokens"] == ids and tok["count"] == len(ids)
    assert httpx.post(server.url + "/detokenize", json={"tokens": ids}, headers=h).json()["prompt"] == \
        offline_llm.get_tokenizer().decode(ids)
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/version").json()["version"]


async def _streamed_text(client: openai.AsyncOpenAI, prompt: str, seed: int) -> str:
    stream = await client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=1.0,
                                             seed=seed, stream=True)
    return "".join([c.choices[0].text async for c in stream if c.choices])


def test_200_concurrent_streams_match_offline_and_free_every_block(server, offline_llm):
    prompts = [f"{PROMPTS[i % 4]} {i}" for i in range(200)]

    async def run_all():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0,
                                    http_client=openai.DefaultAsyncHttpxClient(
                                        limits=httpx.Limits(max_connections=250), timeout=120))
        async with client:
            return await asyncio.gather(*(_streamed_text(client, p, i) for i, p in enumerate(prompts)))

    texts = asyncio.run(run_all())
    refs = offline_llm.generate(prompts, [SamplingParams(max_tokens=12, temperature=1.0, seed=i)
                                          for i in range(200)], use_tqdm=False)
    assert texts == [r.outputs[0].text for r in refs]
    m = wait_all_blocks_free(server)
    assert m["pagedllm:kv_cache_usage_perc"] == 0.0
    assert m["pagedllm:num_requests_running"] == 0 and m["pagedllm:num_requests_waiting"] == 0
    assert m["pagedllm:time_to_first_token_seconds_count"] >= 200
    assert m["pagedllm:generation_tokens_total"] >= sum(len(r.outputs[0].token_ids) for r in refs)


def test_burst_of_long_prompts_overfills_the_pipe_and_all_complete(server):
    """256 prompts of 400 token ids at once: the requests sent to the engine core are larger than a pipe's
    buffer, so the sender must wait for the core to read (it once failed with EAGAIN on the non-blocking
    pipe and every later message was lost: the server hung)."""
    prompts = [[(7 * i + j) % 500 + 3 for j in range(400)] for i in range(256)]

    async def run_all():
        async with httpx.AsyncClient(base_url=server.url, timeout=120,
                                     headers={"Authorization": f"Bearer {server.api_key}"},
                                     limits=httpx.Limits(max_connections=300)) as client:
            replies = await asyncio.gather(*(client.post("/v1/completions", json={
                "model": MODEL_NAME, "prompt": p, "max_tokens": 2, "temperature": 0}) for p in prompts))
            return [(r.status_code, r.json()["usage"]["completion_tokens"]) for r in replies]

    assert asyncio.run(run_all()) == [(200, 2)] * 256
    m = wait_all_blocks_free(server)
    assert m["pagedllm:num_requests_running"] == 0 and m["pagedllm:num_requests_waiting"] == 0
