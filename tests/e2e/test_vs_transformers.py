"""pagedllm against transformers on tiny random models, float32: greedy tokens identical, logprobs within 1e-4,
under chunked prefill, prefix caching on and off, preemption, and mixed greedy/sampled batches."""
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedllm import LLM, SamplingParams
from pagedllm.sampling_params import RequestOutputKind
from pagedllm.runner import model_runner

MAX_NEW = 20
LOGPROB_TOL = 1e-4


def make_prompts():
    rng = np.random.default_rng(0)
    lengths = [1, 5, 16, 17, 31, 48, 70, 100, 9]
    prompts = [rng.integers(3, 512, size=n).tolist() for n in lengths]
    shared = rng.integers(3, 512, size=40).tolist()       # two prompts with a common 40-token prefix
    prompts += [shared + [7, 8, 9], shared + [10, 11]]
    return prompts


PROMPTS = make_prompts()


def hf_greedy(model_dir, prompts, max_new=MAX_NEW, **model_kwargs):
    """Per prompt (no padding): generated ids and the log-softmax of each chosen token."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **model_kwargs)
    results = []
    for p in prompts:
        g = model.generate(torch.tensor([p]), max_new_tokens=max_new, do_sample=False, output_logits=True,
                           return_dict_in_generate=True, pad_token_id=0)
        ids = g.sequences[0, len(p):].tolist()
        lps = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(g.logits, ids)]
        results.append((ids, lps))
    return results


_hf_cache = {}


def reference(model_dir):
    if model_dir not in _hf_cache:
        _hf_cache[model_dir] = hf_greedy(model_dir, PROMPTS)
    return _hf_cache[model_dir]


def check_greedy_matches(outputs, ref, only=None):
    for i, (out, (ids, lps)) in enumerate(zip(outputs, ref)):
        if only is not None and i not in only:
            continue
        comp = out.outputs[0]
        assert comp.token_ids == ids, f"prompt {i}: {comp.token_ids} != {ids}"
        got = [next(iter(pos.values())).logprob for pos in comp.logprobs]
        np.testing.assert_allclose(got, lps, atol=LOGPROB_TOL, rtol=0)
        assert next(iter(comp.logprobs[0])) == ids[0]     # the chosen token comes first


GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, logprobs=0)


MODELS = ["llama", "llama_tied", "qwen2", "qwen3", "llama3_rope", "phi3", "qwen3_moe", "mixtral", "granite",
          "olmo2", "gemma", "gemma2", "gemma3"]


@pytest.mark.parametrize("name", MODELS)
def test_greedy_matches_transformers(tiny_model_dirs, name):
    llm = LLM(tiny_model_dirs[name], dtype="float32", log_stats_interval=0)
    check_greedy_matches(llm.generate(PROMPTS, GREEDY, use_tqdm=False), reference(tiny_model_dirs[name]))


@pytest.mark.parametrize("budget", [16, 32])
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_chunked_prefill_and_prefix_caching(tiny_model_dirs, budget, prefix_caching):
    d = tiny_model_dirs["qwen3"]
    llm = LLM(d, dtype="float32", max_num_batched_tokens=budget, enable_prefix_caching=prefix_caching,
              log_stats_interval=0)
    check_greedy_matches(llm.generate(PROMPTS, GREEDY, use_tqdm=False), reference(d))
    stats = llm.engine.get_stats()
    assert (stats.prefix_cache_hits > 0) == prefix_caching    # the shared 40-token prefix
    assert stats.num_blocks_free == stats.num_blocks_total


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_moe_chunked_prefill_and_prefix_caching(tiny_model_dirs, name):
    """Mixture-of-experts models through 16-token chunks (prefill pieces beside decode rows) and prefix hits."""
    d = tiny_model_dirs[name]
    llm = LLM(d, dtype="float32", max_num_batched_tokens=16, enable_prefix_caching=True, log_stats_interval=0)
    check_greedy_matches(llm.generate(PROMPTS, GREEDY, use_tqdm=False), reference(d))
    assert llm.engine.get_stats().prefix_cache_hits > 0


def test_prefix_cache_hits_across_generate_calls(tiny_model_dirs):
    d = tiny_model_dirs["llama"]
    llm = LLM(d, dtype="float32", log_stats_interval=0)
    llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    hits_before = llm.engine.get_stats().prefix_cache_hits
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)      # everything is cached now
    check_greedy_matches(outputs, reference(d))
    assert llm.engine.get_stats().prefix_cache_hits - hits_before >= sum((len(p) - 1) // 16 * 16 for p in PROMPTS)
    assert outputs[7].num_cached_tokens == 96


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preemption_keeps_outputs_exact(tiny_model_dirs, prefix_caching):
    d = tiny_model_dirs["llama"]
    # 14 blocks of 16 slots: the longest request alone needs 8; all 11 together need ~35.
    llm = LLM(d, dtype="float32", num_gpu_blocks_override=14, enable_prefix_caching=prefix_caching,
              log_stats_interval=0)
    check_greedy_matches(llm.generate(PROMPTS, GREEDY, use_tqdm=False), reference(d))
    stats = llm.engine.get_stats()
    assert stats.num_preemptions > 0
    assert stats.num_blocks_free == stats.num_blocks_total


def test_n_above_max_num_seqs_runs_as_with_room(tiny_model_dirs):
    """vLLM bounds n by VLLM_MAX_N_SEQUENCES only: the sequences past max_num_seqs wait for a place. It was refused
    here; each seeded sequence's tokens are those it gets with room for all, best_of's too."""
    params = SamplingParams(n=8, seed=1, max_tokens=12, temperature=1.0, ignore_eos=True)
    best = SamplingParams(n=2, best_of=9, seed=1, max_tokens=12, temperature=1.0, ignore_eos=True)
    outs = [LLM(tiny_model_dirs["llama"], dtype="float32", max_num_seqs=seqs).generate(
        [PROMPTS[0], PROMPTS[1], PROMPTS[2]], [params, params, best], use_tqdm=False) for seqs in (3, 64)]
    tokens = [[[c.token_ids for c in o.outputs] for o in run] for run in outs]
    assert tokens[0] == tokens[1] and [len(t) for t in tokens[0]] == [8, 8, 2]


def test_seeded_sampling_survives_preemption(tiny_model_dirs):
    """A request preempted while its next token is still being sampled (steps overlap) keeps that token:
    seeded outputs equal those of an engine that never preempts."""
    d = tiny_model_dirs["llama"]
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=MAX_NEW, ignore_eos=True) for i in range(len(PROMPTS))]
    roomy = LLM(d, dtype="float32", log_stats_interval=0).generate(PROMPTS, params, use_tqdm=False)
    tight = LLM(d, dtype="float32", num_gpu_blocks_override=14, log_stats_interval=0)
    outputs = tight.generate(PROMPTS, params, use_tqdm=False)
    assert tight.engine.get_stats().num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in roomy]


def test_mixed_greedy_and_sampled_batch(tiny_model_dirs):
    d = tiny_model_dirs["qwen2"]
    llm = LLM(d, dtype="float32", max_num_batched_tokens=32, log_stats_interval=0)
    params = [GREEDY if i % 2 == 0 else SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=i,
                                                        max_tokens=MAX_NEW, logprobs=0)
              for i in range(len(PROMPTS))]
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    check_greedy_matches(outputs, reference(d), only=range(0, len(PROMPTS), 2))
    sampled = [outputs[i].outputs[0].token_ids for i in range(1, len(PROMPTS), 2)]
    assert all(len(s) == MAX_NEW or s[-1] == 2 for s in sampled)
    greedy_of_sampled = [reference(d)[i][0] for i in range(1, len(PROMPTS), 2)]
    assert sampled != greedy_of_sampled


def test_seeded_sampling_is_independent_of_batch(tiny_model_dirs):
    d = tiny_model_dirs["llama"]
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=MAX_NEW, ignore_eos=True)
    alone = LLM(d, dtype="float32", log_stats_interval=0).generate([PROMPTS[4]], seeded, use_tqdm=False)
    alone = alone[0].outputs[0].token_ids
    llm = LLM(d, dtype="float32", max_num_batched_tokens=24, seed=7, log_stats_interval=0)
    others = [SamplingParams(temperature=1.0, max_tokens=MAX_NEW), SamplingParams(temperature=0.7, seed=5)]
    batch = llm.generate(PROMPTS[:4] + [PROMPTS[4]] + PROMPTS[5:7],
                         [others[0], others[1], GREEDY, others[0], seeded, others[1], others[0]], use_tqdm=False)
    assert batch[4].outputs[0].token_ids == alone
    again = llm.generate([PROMPTS[4]], SamplingParams(temperature=1.0, seed=1235, max_tokens=MAX_NEW,
                                                      ignore_eos=True), use_tqdm=False)
    assert again[0].outputs[0].token_ids != alone


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_parallel_sampling_shares_prompt_blocks(tiny_model_dirs, prefix_caching):
    d = tiny_model_dirs["llama"]
    llm = LLM(d, dtype="float32", enable_prefix_caching=prefix_caching, log_stats_interval=0)
    prompt = PROMPTS[6][:40]                                     # 2 full blocks + 8 tokens
    params = SamplingParams(n=4, temperature=1.0, seed=0, max_tokens=8, ignore_eos=True,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    llm.engine.add_request("p", prompt, params)
    llm.engine.step()                                            # prefill all four, first tokens sampled
    stats = llm.engine.get_stats()
    assert stats.num_blocks_used == 2 + 4                        # shared full blocks + one tail each (not 12)
    assert stats.num_prompt_tokens == 40 + 3 * 8                 # the full blocks were computed once
    outputs = []
    while llm.engine.has_unfinished_requests():
        outputs += llm.engine.step()
    (out,) = outputs
    assert [c.index for c in out.outputs] == [0, 1, 2, 3] and all(len(c.token_ids) == 8 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1    # seeds differ per sequence
    assert llm.engine.get_stats().num_blocks_free == stats.num_blocks_total
    # Another request with the same prompt reuses those blocks only when prefix caching is on.
    again = llm.generate([prompt], SamplingParams(max_tokens=1), use_tqdm=False)[0]
    assert again.num_cached_tokens == (32 if prefix_caching else 0)


@pytest.mark.parametrize("rows,name", [(None, "qwen3"), (5, "qwen3"), (None, "qwen3_moe"), (None, "mixtral")],
                         ids=["whole-chunks", "logits-5-rows-at-a-time", "qwen3_moe", "mixtral"])
def test_prompt_logprobs_match_transformers(tiny_model_dirs, monkeypatch, rows, name):
    if rows is not None:
        monkeypatch.setattr(model_runner, "PROMPT_LOGPROBS_ROWS", rows)
    d = tiny_model_dirs[name]
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    prompt = PROMPTS[7]
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)
    llm = LLM(d, dtype="float32", max_num_batched_tokens=32, log_stats_interval=0)
    out = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=3), use_tqdm=False)[0]
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        assert len(entry) in (3, 4)
        assert abs(entry[prompt[pos]].logprob - ref[pos - 1, prompt[pos]].item()) < LOGPROB_TOL
        top = ref[pos - 1].topk(3)
        for rank, (lp, tid) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1):
            assert abs(entry[tid].logprob - lp) < LOGPROB_TOL


def test_top_logprobs_match_transformers(tiny_model_dirs):
    d = tiny_model_dirs["llama_tied"]
    (ids, _), = hf_greedy(d, [PROMPTS[3]], max_new=4)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([PROMPTS[3] + ids])).logits[0].float(), -1)
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=5)
    out = LLM(d, dtype="float32", log_stats_interval=0).generate([PROMPTS[3]], params, use_tqdm=False)[0]
    comp = out.outputs[0]
    assert comp.token_ids == ids
    for step, pos in enumerate(comp.logprobs):
        ref = full[len(PROMPTS[3]) - 1 + step]
        top = ref.topk(5)
        assert [lp.rank for lp in pos.values()][0] == 1
        for tid, lp in zip(top.indices.tolist(), top.values.tolist()):
            assert abs(pos[tid].logprob - lp) < LOGPROB_TOL
    assert abs(comp.cumulative_logprob - sum(next(iter(p.values())).logprob for p in comp.logprobs)) < 1e-5


def test_logprob_token_ids_match_transformers(tiny_model_dirs):
    """vLLM's logprob_token_ids: each step's entry holds the chosen token (ranked) and the named ids (unranked),
    with transformers' logprobs, beside a request asking for its top-3 in the same steps."""
    d = tiny_model_dirs["llama_tied"]
    (ids, _), = hf_greedy(d, [PROMPTS[3]], max_new=4)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([PROMPTS[3] + ids])).logits[0].float(), -1)
    named = [40, 7, 300]
    params = [SamplingParams(temperature=0, max_tokens=4, logprob_token_ids=named),
              SamplingParams(temperature=0, max_tokens=4, logprobs=3)]
    outs = LLM(d, dtype="float32", log_stats_interval=0).generate([PROMPTS[3]] * 2, params, use_tqdm=False)
    comp, top = outs[0].outputs[0], outs[1].outputs[0]
    assert comp.token_ids == top.token_ids == ids
    for step, (pos, top_pos) in enumerate(zip(comp.logprobs, top.logprobs)):
        ref = full[len(PROMPTS[3]) - 1 + step]
        assert list(pos) == list(dict.fromkeys([ids[step], *named])) and pos[ids[step]].rank == 1
        assert all(pos[t].rank is None for t in named if t != ids[step])
        for t in pos:
            assert abs(pos[t].logprob - ref[t].item()) < LOGPROB_TOL
        assert set(top_pos) - {ids[step]} <= set(ref.topk(3).indices.tolist())


@pytest.mark.parametrize("name", ["phi3_longrope", "phi4_mini"])
def test_longrope_matches_transformers_on_each_side_of_the_original_context(tiny_model_dirs, name):
    """longrope (original_max_position_embeddings 64 of 512; phi4_mini also rotates 3/4 of each head): by default
    max_model_len is the original context and short_factor runs (vLLM's default), as transformers' on sequences
    within it; a longer max_model_len takes long_factor for every position (vLLM's choice), as transformers' on
    prompts past the original context. Through the engine: chunked prefill, prefix caching."""
    d = tiny_model_dirs[name]
    short = [p for p in PROMPTS if len(p) + MAX_NEW <= 64]
    llm = LLM(d, dtype="float32", max_num_batched_tokens=16, log_stats_interval=0)
    assert llm.engine.max_model_len == 64
    check_greedy_matches(llm.generate(short, GREEDY, use_tqdm=False), hf_greedy(d, short))
    long = [p for p in PROMPTS if len(p) > 64]
    llm = LLM(d, dtype="float32", max_model_len=256, max_num_batched_tokens=32, log_stats_interval=0)
    check_greedy_matches(llm.generate(long, GREEDY, use_tqdm=False), hf_greedy(d, long))
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([long[-1]])).logits[0].float(), -1)
    out = llm.generate([long[-1]], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    got = [out.prompt_logprobs[i][t].logprob for i, t in enumerate(long[-1]) if i > 0]
    want = [ref[i - 1, t].item() for i, t in enumerate(long[-1]) if i > 0]
    np.testing.assert_allclose(got, want, atol=LOGPROB_TOL, rtol=0)


def window_prompts() -> list[list[int]]:
    """Prompts and outputs past a 32-token window: two sharing 64 tokens (prefix hits mid-window), one of 80, one
    whose 40 outputs alone pass it."""
    rng = np.random.default_rng(1)
    shared = rng.integers(3, 512, size=64).tolist()
    return [shared + rng.integers(3, 512, size=16).tolist(), shared + rng.integers(3, 512, size=20).tolist(),
            rng.integers(3, 512, size=80).tolist(), rng.integers(3, 512, size=5).tolist()]


@pytest.mark.parametrize("arch,kw", [("mistral", dict(seed=5)), ("phi3", dict(seed=8)),
                                     ("gemma2", dict(seed=9, tie_word_embeddings=True)), ("gemma3", dict(seed=15))])
def test_sliding_window_matches_transformers_past_the_window(tmp_path, arch, kw):
    """Mistral-7B-v0.1's sliding_window (4096 of 32768) and Phi-3-mini-4k's (2047 of 4096) as transformers applies
    them (each query sees its last `window` positions), and Gemma 2's on alternate layers with its soft caps:
    max_model_len stays max_position_embeddings, and greedy tokens and logprobs match transformers' eager attention
    (Mistral's and Phi-3's sdpa gives the same) on sequences 3x the window long, through 16-token chunks and
    prefix-cache hits."""
    from conftest import make_tiny_model
    d = make_tiny_model(tmp_path / arch, arch=arch, sliding_window=32, **kw)
    prompts = window_prompts()
    ref = hf_greedy(d, prompts, max_new=40, attn_implementation="eager")
    params = SamplingParams(temperature=0.0, max_tokens=40, logprobs=0)
    for budget in (None, 16):
        llm = LLM(d, dtype="float32", max_num_batched_tokens=budget, enable_prefix_caching=True,
                  log_stats_interval=0)
        assert llm.engine.max_model_len == 512   # no longer capped at the window
        check_greedy_matches(llm.generate(prompts, params, use_tqdm=False), ref)
        hits = llm.engine.get_stats().prefix_cache_hits
        assert hits > 0   # the shared 64 tokens
        check_greedy_matches(llm.generate(prompts, params, use_tqdm=False), ref)   # now every prompt hits
        assert llm.engine.get_stats().prefix_cache_hits - hits >= sum((len(p) - 1) // 16 * 16 for p in prompts)
