"""Random completion and chat requests through the official `openai` client: each one's text, finish reasons,
token logprobs and usage equal offline LLM.generate / LLM.chat with the same fields, and its stream, joined,
equals its non-streamed answer (the fields drawn: prompt as text, ids or a list of either, n, seed, temperature,
top-k / top-p / min-p, max_tokens, min_tokens, stop strings and ids, penalties, logit bias, logprobs, echo,
include_usage, truncate_prompt_tokens, truncation_side, return_token_ids)."""
import numpy as np
import openai
import pytest
from server.server_utils import CHAT_TEMPLATE, MODEL_NAME, stream_text, wait_all_blocks_free

from pagedllm import SamplingParams

WORDS = ["Once", "upon", "a", "time", "the", "little", "dog", "cat", "Lily", "park", "went", "to", "and", "was"]
REQUESTS = 24


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0)


def _random_fields(rng: np.random.Generator) -> dict:
    """Request fields (OpenAI's and vLLM's names) that SamplingParams takes under the same name."""
    f = {"n": int(rng.choice([1, 1, 2, 3])), "max_tokens": int(rng.integers(1, 24))}
    if rng.random() < 0.6:
        f.update(temperature=float(rng.choice([0.5, 1.0])), seed=int(rng.integers(1 << 30)))
        if rng.random() < 0.5:
            f.update(top_k=int(rng.choice([5, 40])), top_p=float(rng.choice([0.8, 1.0])),
                     min_p=float(rng.choice([0.0, 0.1])))
    else:
        f["temperature"] = 0.0
    for name, values in (("stop", [[" the"], ["a", "Lily"], ["."]]), ("stop_token_ids", [[13], [4, 29]]),
                         ("min_tokens", [2, 5]), ("presence_penalty", [1.0, -0.5]), ("frequency_penalty", [0.7]),
                         ("repetition_penalty", [1.3]), ("logit_bias", [{"100": 5.0, "7": -100.0}])):
        if rng.random() < 0.15:
            f[name] = values[int(rng.integers(len(values)))]
    if "min_tokens" in f:
        f["max_tokens"] = max(f["max_tokens"], f["min_tokens"])
    if rng.random() < 0.4:
        f["logprobs"] = int(rng.choice([0, 2]))
    if rng.random() < 0.15:
        f["truncate_prompt_tokens"] = int(rng.choice([1, 3]))
        if rng.random() < 0.5:
            f["truncation_side"] = str(rng.choice(["left", "right"]))
    return f


EXTRA = ("top_k", "min_p", "min_tokens", "stop_token_ids", "repetition_penalty", "truncate_prompt_tokens",
         "truncation_side", "return_token_ids")   # vLLM's fields: the openai client sends them in extra_body


def _params(f: dict) -> SamplingParams:
    kw = {k: v for k, v in f.items() if k != "logit_bias"}
    if "logit_bias" in f:
        kw["logit_bias"] = {int(k): v for k, v in f["logit_bias"].items()}
    return SamplingParams(**kw)


def _check_logprobs(got: list[float], ref_ids: list[int], ref_logprobs):
    assert len(got) == len(ref_ids)
    for value, tid, position in zip(got, ref_ids, ref_logprobs):
        assert value == pytest.approx(position[tid].logprob, abs=1e-4)


def test_random_completions_equal_offline(client, server, offline_llm):
    rng = np.random.default_rng(0)
    tok = offline_llm.get_tokenizer()
    for i in range(REQUESTS):
        f = _random_fields(rng)
        texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 12)))) for _ in range(int(rng.integers(1, 3)))]
        as_ids = rng.random() < 0.5   # OpenAI's prompt: text(s) or id list(s), not both in one list
        prompts = [tok.encode(t) if as_ids else t for t in texts]
        echo = bool(rng.random() < 0.3) and "truncate_prompt_tokens" not in f
        body = dict(model=MODEL_NAME, prompt=prompts if len(prompts) > 1 else prompts[0], echo=echo, **f,
                    return_token_ids=bool(rng.random() < 0.3))
        if "logprobs" in f:
            body["logprobs"] = max(f["logprobs"], 1)   # OpenAI's completions: 0 means none
        extra = {k: body.pop(k) for k in EXTRA if k in body}
        full = client.completions.create(extra_body=extra, **body)
        streamed, reasons, usage = stream_text(client.completions.create(
            extra_body=extra, stream=True, stream_options={"include_usage": True}, **body))
        # truncation_side given: the server cuts a text as tokenized, BOS and all (vLLM's), which offline does to
        # token ids
        cut = [tok.encode(p) if isinstance(p, str) and "truncation_side" in f else p for p in prompts]
        refs = offline_llm.generate(cut, _params({**f, **({"logprobs": body["logprobs"]}
                                                           if "logprobs" in body else {})}), use_tqdm=False)
        where = f"request {i}: {body} {extra}"
        echoed = [p if isinstance(p, str) else tok.decode(p) for p in prompts]   # a text prompt as it was sent
        # echo's text (vLLM's: none with return_token_ids, whose prompt_token_ids are the echo)
        expected = [(e if echo and not extra["return_token_ids"] else "") + c.text
                    for e, r in zip(echoed, refs) for c in r.outputs]
        assert [c.text for c in full.choices] == expected, where
        assert [streamed[c.index] for c in full.choices] == expected, where
        assert [c.finish_reason for c in full.choices] == [reasons[c.index] for c in full.choices] == \
            [c.finish_reason for r in refs for c in r.outputs], where
        num_out = sum(len(c.token_ids) for r in refs for c in r.outputs)
        assert (full.usage.prompt_tokens, full.usage.completion_tokens) == \
            (usage.prompt_tokens, usage.completion_tokens) == \
            (sum(len(r.prompt_token_ids) for r in refs), num_out), where
        if extra["return_token_ids"]:
            assert [(c.prompt_token_ids, c.token_ids) for c in full.choices] == \
                [(r.prompt_token_ids, list(c.token_ids)) for r in refs for c in r.outputs], where
        if "logprobs" in body:
            outs = [c for r in refs for c in r.outputs]
            for choice, c, r in zip(full.choices, outs, [r for r in refs for _ in r.outputs]):
                got = choice.logprobs.token_logprobs[len(r.prompt_token_ids) if echo else 0:]
                _check_logprobs(got, c.token_ids, c.logprobs)
    wait_all_blocks_free(server)


def test_random_chats_equal_offline(client, server, offline_llm):
    rng = np.random.default_rng(1)
    for i in range(REQUESTS // 2):
        f = _random_fields(rng)
        messages = [{"role": "user", "content": " ".join(rng.choice(WORDS, size=int(rng.integers(1, 10))))}]
        body = dict(model=MODEL_NAME, messages=messages, **{k: v for k, v in f.items() if k != "logprobs"},
                    return_token_ids=bool(rng.random() < 0.3))
        if "logprobs" in f:
            body.update(logprobs=True, top_logprobs=f["logprobs"])
        extra = {k: body.pop(k) for k in EXTRA if k in body}
        full = client.chat.completions.create(extra_body=extra, **body)
        streamed, reasons, usage = stream_text(client.chat.completions.create(
            extra_body=extra, stream=True, stream_options={"include_usage": True}, **body))
        [ref] = offline_llm.chat(messages, _params(f), use_tqdm=False, chat_template=CHAT_TEMPLATE)
        where = f"chat {i}: {body} {extra}"
        assert [c.message.content for c in full.choices] == [c.text for c in ref.outputs], where
        assert [streamed.get(c.index, "") for c in full.choices] == [c.text for c in ref.outputs], where
        assert [c.finish_reason for c in full.choices] == [reasons[c.index] for c in full.choices] == \
            [c.finish_reason for c in ref.outputs], where
        assert (full.usage.prompt_tokens, full.usage.completion_tokens) == \
            (usage.prompt_tokens, usage.completion_tokens) == \
            (len(ref.prompt_token_ids), sum(len(c.token_ids) for c in ref.outputs)), where
        if extra["return_token_ids"]:
            assert full.model_extra["prompt_token_ids"] == ref.prompt_token_ids, where
            assert [c.token_ids for c in full.choices] == [list(c.token_ids) for c in ref.outputs], where
        if "logprobs" in f:
            for choice, c in zip(full.choices, ref.outputs):
                _check_logprobs([e.logprob for e in choice.logprobs.content], c.token_ids, c.logprobs)
    wait_all_blocks_free(server)
