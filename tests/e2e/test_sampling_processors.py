"""Logits processors end to end on a tiny random model, float32, against transformers' generate: greedy tokens
identical with repetition_penalty, with presence/frequency penalties and with bad words, in one batch
that mixes rows with and without them. The engine's steps overlap (a row's last token is still in flight
when the next step is built), so every decode step here also checks that the in-flight token is counted."""
import numpy as np
import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList, NoBadWordsLogitsProcessor

from pagedllm import LLM, SamplingParams

MAX_NEW = 24
PROMPTS = [np.random.default_rng(i).integers(3, 512, size=n).tolist() for i, n in enumerate([4, 11, 23, 40])]


class OutputPenalties(LogitsProcessor):
    """OpenAI's presence and frequency penalties over the generated tokens only (transformers has none)."""

    def __init__(self, prompt_len: int, presence: float, frequency: float):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        counts = torch.zeros_like(scores, dtype=torch.int32)
        out = input_ids[:, self.prompt_len:]
        counts.scatter_add_(1, out, torch.ones_like(out, dtype=torch.int32))
        scores = scores - torch.tensor([self.frequency]) * counts
        return scores - torch.tensor([self.presence]) * (counts > 0)


class OnOutput(LogitsProcessor):
    """A transformers processor shown the generated tokens only: vLLM matches bad words on the output."""

    def __init__(self, processor, prompt_len: int):
        self.processor, self.prompt_len = processor, prompt_len

    def __call__(self, input_ids, scores):
        return self.processor(input_ids[:, self.prompt_len:], scores)


def hf_generate(model, prompt, **kwargs) -> list[int]:
    g = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0, **kwargs)
    return g[0, len(prompt):].tolist()


def engine_greedy(llm, params_per_prompt) -> list[list[int]]:
    outputs = llm.generate(PROMPTS, params_per_prompt, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


def greedy(**kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_NEW, **kwargs)


def test_penalties_match_transformers_generate(tiny_model_dirs):
    d = tiny_model_dirs["llama"]
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    llm = LLM(d, dtype="float32", log_stats_interval=0)
    plain = engine_greedy(llm, [greedy()] * len(PROMPTS))
    # Mixed batch: rows 0 and 2 penalised (different kinds), rows 1 and 3 plain.
    params = [greedy(repetition_penalty=1.8), greedy(), greedy(presence_penalty=1.5, frequency_penalty=2.0),
              greedy()]
    got = engine_greedy(llm, params)
    assert got[0] == hf_generate(model, PROMPTS[0], repetition_penalty=1.8)
    assert got[2] == hf_generate(model, PROMPTS[2], logits_processor=LogitsProcessorList(
        [OutputPenalties(len(PROMPTS[2]), 1.5, 2.0)]))
    assert got[1] == plain[1] and got[3] == plain[3]
    assert got[0] != plain[0] and got[2] != plain[2]         # the penalties took effect
    # Every row penalised, then repetition and output penalties together in one request.
    got = engine_greedy(llm, [greedy(repetition_penalty=0.7)] * len(PROMPTS))
    assert got == [hf_generate(model, p, repetition_penalty=0.7) for p in PROMPTS]
    both = greedy(repetition_penalty=1.3, presence_penalty=-0.5, frequency_penalty=0.8)
    got = engine_greedy(llm, [both] * len(PROMPTS))
    assert got == [hf_generate(model, p, repetition_penalty=1.3, logits_processor=LogitsProcessorList(
        [OutputPenalties(len(p), -0.5, 0.8)])) for p in PROMPTS]


def words_in(output: list[int], engine) -> list[str]:
    """A one-token and a two-token word of a greedy output whose text tokenizes back to those tokens (the
    random model emits byte tokens too), so that banning them changes the output."""
    tok, tokenize = engine.tokenizer, engine.input_processor._bad_words_ids
    one = next(tok.decode(output[j:j + 1]) for j in range(2, len(output))
               if output[j:j + 1] in tokenize([tok.decode(output[j:j + 1])]))
    two = next(tok.decode(output[j:j + 2]) for j in range(len(output) - 1)
               if output[j:j + 2] in tokenize([tok.decode(output[j:j + 2])]))
    return [one, two]


def test_bad_words_match_transformers_generate(tiny_model_dirs):
    d = tiny_model_dirs["llama"]
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    llm = LLM(d, dtype="float32", log_stats_interval=0)
    plain = engine_greedy(llm, [greedy()] * len(PROMPTS))
    words = [words_in(out, llm.engine) for out in plain]
    params = [greedy(bad_words=w) if i != 1 else greedy() for i, w in enumerate(words)]
    requests = [llm.engine.input_processor.process(str(i), p, params[i]) for i, p in enumerate(PROMPTS)]
    got = engine_greedy(llm, params)
    for i, (prompt, req) in enumerate(zip(PROMPTS, requests)):
        ids = req.params.bad_words_token_ids
        if i == 1:
            assert ids == [] and got[1] == plain[1]
            continue
        assert any(len(w) > 1 for w in ids)
        want = hf_generate(model, prompt, logits_processor=LogitsProcessorList(
            [OnOutput(NoBadWordsLogitsProcessor(ids), len(prompt))]))
        assert got[i] == want, i
        assert got[i] != plain[i]
        for w in ids:
            assert all(got[i][j:j + len(w)] != w for j in range(len(got[i])))


def test_logit_bias_and_allowed_token_ids_take_effect(tiny_model_dirs):
    d = tiny_model_dirs["llama"]
    llm = LLM(d, dtype="float32", log_stats_interval=0)
    plain = engine_greedy(llm, [greedy()] * len(PROMPTS))
    allowed = [5, 77, 301]
    got = engine_greedy(llm, [greedy(logit_bias={str(plain[0][0]): -100}), greedy(allowed_token_ids=allowed),
                              greedy(logit_bias={123: 100}), greedy()])
    assert got[0][0] != plain[0][0]
    assert set(got[1]) <= set(allowed) and len(got[1]) == MAX_NEW
    assert got[2] == [123] * MAX_NEW and got[3] == plain[3]


def test_min_tokens_bans_eos_also_with_ignore_eos(tiny_model_dirs):
    """vLLM's min_tokens bans the EOS ids whether or not ignore_eos is set (ignore_eos only keeps EOS from
    ending the request): with EOS made certain, the first min_tokens tokens are still others."""
    llm = LLM(tiny_model_dirs["llama"], dtype="float32", log_stats_interval=0)
    params = SamplingParams(temperature=0.0, max_tokens=6, min_tokens=3, ignore_eos=True, logit_bias={2: 100})
    [out] = llm.generate([PROMPTS[1]], params, use_tqdm=False)
    tokens = out.outputs[0].token_ids
    assert 2 not in tokens[:3] and tokens[3:] == [2, 2, 2] and out.outputs[0].finish_reason == "length"


def test_extreme_seeds_and_top_k_run(tiny_model_dirs):
    """These killed the engine core: a seed of 2**64-1 with n=2 (the second child's seed overflowed) and
    top_k >= 2**63 (int64 overflow in the sampler); top_k above the vocabulary means all tokens."""
    llm = LLM(tiny_model_dirs["llama"], dtype="float32", log_stats_interval=0)
    out = llm.generate([PROMPTS[1]], SamplingParams(n=2, seed=2**64 - 1, max_tokens=8, ignore_eos=True),
                       use_tqdm=False)
    assert [len(c.token_ids) for c in out[0].outputs] == [8, 8]
    huge, off = (llm.generate([PROMPTS[1]], SamplingParams(top_k=k, seed=3, max_tokens=8), use_tqdm=False)
                 for k in (2**63, 0))
    assert huge[0].outputs[0].token_ids == off[0].outputs[0].token_ids


def test_penalties_and_bad_words_survive_preemption(tiny_model_dirs):
    """The runner keeps a preempted request's token counts: outputs equal those of an engine with room."""
    d = tiny_model_dirs["llama"]
    params = [greedy(repetition_penalty=1.3, presence_penalty=-0.5, frequency_penalty=0.8, bad_words=["the"],
                     ignore_eos=True)] * len(PROMPTS)
    roomy = engine_greedy(LLM(d, dtype="float32", log_stats_interval=0), params)
    tight = LLM(d, dtype="float32", num_gpu_blocks_override=5, log_stats_interval=0)
    assert engine_greedy(tight, params) == roomy
    assert tight.engine.get_stats().num_preemptions > 0


def test_repetition_detection_ends_a_repeating_output(tiny_model_dirs):
    """vLLM's repetition_detection: one allowed token makes the output repeat it; it ends after min_count
    of them (finish_reason "repetition", stop_reason "repetition_detected"), not before min_tokens; speculative
    decoding (the model as its own draft, every proposal accepted) stops at the same token."""
    d = tiny_model_dirs["llama"]
    rep = {"max_pattern_size": 2, "min_count": 4}
    for llm in (LLM(d, dtype="float32", log_stats_interval=0),
                LLM(d, dtype="float32", log_stats_interval=0, speculative_config={
                    "method": "draft_model", "model": d, "num_speculative_tokens": 3})):
        [o] = llm.generate(["Once upon"], SamplingParams(temperature=0.0, max_tokens=20, allowed_token_ids=[77],
                                                         repetition_detection=rep), use_tqdm=False)
        out = o.outputs[0]
        assert (out.token_ids, out.finish_reason, out.stop_reason) == ([77] * 4, "repetition", "repetition_detected")
        [o] = llm.generate(["Once upon"], SamplingParams(temperature=0.0, max_tokens=20, allowed_token_ids=[77],
                                                         min_tokens=7, repetition_detection=rep), use_tqdm=False)
        assert o.outputs[0].token_ids == [77] * 7 and o.outputs[0].finish_reason == "repetition"
    [plain] = llm.generate(["Once upon"], SamplingParams(temperature=0.0, max_tokens=12, repetition_detection={
        "max_pattern_size": 3, "min_count": 3}), use_tqdm=False)
    assert plain.outputs[0].finish_reason == "length"   # the greedy text of this prompt does not repeat so
