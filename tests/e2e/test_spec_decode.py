"""Speculative decoding end to end on tiny float32 models: greedy tokens and logprobs identical to transformers and
to the engine without speculation, for both proposers, under preemption and chunked prefill, with rows that may
not speculate in the same steps; seeded sampling reproducible; no block leaks; config errors name the key."""
from pathlib import Path

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.config import DEMO_MODEL
from test_vs_transformers import GREEDY, MAX_NEW, PROMPTS, check_greedy_matches, reference

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


def draft(model_dir: str, k: int = 4) -> dict:
    return {"method": "draft_model", "model": model_dir, "num_speculative_tokens": k}


def run(model_dir, spec, prompts=PROMPTS, params=GREEDY, **kw):
    llm = LLM(model_dir, dtype="float32", log_stats_interval=0, speculative_config=spec, **kw)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    stats = llm.engine.get_stats()
    assert stats.num_blocks_free == stats.num_blocks_total   # nothing leaked, rejected slots included
    return outputs, stats


def test_ngram_greedy_matches_transformers(tiny_model_dirs):
    d = tiny_model_dirs["llama"]
    outputs, stats = run(d, NGRAM, max_num_seqs=16)
    check_greedy_matches(outputs, reference(d))
    sd = stats.spec_decode
    assert sd.num_drafts > 0 and 0 < sd.num_accepted_tokens <= sd.num_draft_tokens
    assert sum(len(o.outputs[0].token_ids) for o in outputs) == stats.num_generation_tokens


@pytest.mark.parametrize("draft_name", ["llama", "qwen2"])
def test_draft_model_greedy_matches_transformers(tiny_model_dirs, draft_name):
    """The target as its own draft accepts every proposal; another model rarely does: exact either way."""
    d = tiny_model_dirs["llama"]
    outputs, stats = run(d, draft(tiny_model_dirs[draft_name]), max_num_seqs=16)
    check_greedy_matches(outputs, reference(d))
    sd = stats.spec_decode
    if draft_name == "llama":
        assert sd.num_accepted_tokens == sd.num_draft_tokens > 0
        assert sd.mean_acceptance_length > 4
    else:
        assert sd.num_accepted_tokens < sd.num_draft_tokens



@pytest.mark.parametrize("name, prepass", [("gemma2", False), ("gemma2", True), ("gemma3", True)])   # gemma3's
def test_sliding_window_and_soft_caps_through_speculation(tiny_model_dirs, monkeypatch, prepass, name):   # ~13 s
    """Gemma 2 (a 24-token window on layer 0, soft caps) and Gemma 3 (the window on layers 0 and 2, a RoPE per
    layer type) as their own draft: the one-token verify rows and the draft's passes (behind the verify too:
    prepass) each attend within their own position's window, so every proposal is accepted and the tokens are
    transformers'; n-gram proposals too."""
    from pagedllm.runner import model_runner
    monkeypatch.setattr(model_runner, "PREPASS_ON_CPU", prepass)
    d = tiny_model_dirs[name]
    outputs, stats = run(d, draft(d), max_num_seqs=16)
    check_greedy_matches(outputs, reference(d))
    assert stats.spec_decode.num_accepted_tokens == stats.spec_decode.num_draft_tokens > 0
    outputs, stats = run(d, NGRAM, max_num_seqs=16)
    check_greedy_matches(outputs, reference(d))
    assert stats.spec_decode.num_accepted_tokens > 0

@pytest.mark.parametrize("synthetic,kernel", [(False, False), (True, False), (False, True), (True, True)])
def test_passes_behind_the_verify(tiny_model_dirs, monkeypatch, synthetic, kernel):
    """DraftModel.prepass runs a step's proposal passes behind the previous verify, from the device's emitted
    tokens (on a CPU only when PREPASS_ON_CPU). With the target as its own draft every proposal is the target's
    greedy token when the draft was fed the right tokens at the right positions: all accepted (e_s and the bonus
    token fed first), or, under synthetic rejections (0.8 a position), some rejected and the target's token fed;
    outputs stay exact either way. Passes whose position had no slot then run in the next step. kernel: the
    passes' inputs made by CUDA's Triton kernel, run by the Triton interpreter."""
    from pagedllm.runner import model_runner
    from pagedllm.spec_decode import draft_model
    from pagedllm.spec_decode.draft_model import DraftModel
    monkeypatch.setattr(model_runner, "PREPASS_ON_CPU", True)
    if kernel:
        monkeypatch.setattr(draft_model, "prepass_inputs", _interpreted_prepass_inputs(monkeypatch))
    prepass_depth = DraftModel._prepass_depth
    seen = []   # (rows the pre-pass served, rows, passes it served) a step

    def spy(self, pre, rows):
        depth = prepass_depth(self, pre, rows)
        seen.append((sum(d > 0 for d in depth), len(rows), sum(depth)))
        return depth
    monkeypatch.setattr(DraftModel, "_prepass_depth", spy)
    d = tiny_model_dirs["llama"]
    cfg = draft(d)
    if synthetic:
        cfg.update(rejection_sample_method="synthetic", synthetic_acceptance_rates=[0.8, 0.64, 0.512, 0.4096])
    outputs, stats = run(d, cfg, max_num_seqs=16)
    check_greedy_matches(outputs, reference(d))
    served, rows = sum(a for a, _, _ in seen), sum(b for _, b, _ in seen)
    assert served > rows / 2, seen
    assert sum(d for _, _, d in seen) > 2 * rows, seen     # later passes too
    sd = stats.spec_decode
    if synthetic:
        assert 0 < sd.num_accepted_tokens < sd.num_draft_tokens
    else:
        assert sd.num_accepted_tokens == sd.num_draft_tokens > 0
        assert served < rows, seen       # bonus tokens past their rows' blocks


def _interpreted_prepass_inputs(monkeypatch):
    """spec_decode/prepass_kernel.py loaded afresh with TRITON_INTERPRET set (read when kernels are decorated),
    so that its kernel runs on CPU tensors."""
    import importlib.util

    pytest.importorskip("triton")
    from pagedllm.spec_decode import prepass_inputs
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    path = Path(prepass_inputs.__file__).with_name("prepass_kernel.py")
    spec = importlib.util.spec_from_file_location("prepass_kernel_interpreted", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.prepass_inputs_cuda


@pytest.mark.parametrize("spec", ["ngram", "draft"])
def test_exact_under_preemption_and_chunked_prefill(tiny_model_dirs, spec):
    d = tiny_model_dirs["qwen2"]
    cfg = NGRAM if spec == "ngram" else draft(tiny_model_dirs["qwen2"], 3)
    outputs, stats = run(d, cfg, num_gpu_blocks_override=14, max_num_batched_tokens=32, max_num_seqs=16)
    check_greedy_matches(outputs, reference(d))
    assert stats.num_preemptions > 0 and stats.spec_decode.num_accepted_tokens > 0


def test_rows_that_do_not_speculate_share_the_steps(tiny_model_dirs):
    """Penalties, logit bias, min_tokens and stop ids in the same batch: each request's tokens equal those of
    the engine without speculation; logprobs (top-N and logprob_token_ids) too."""
    d = tiny_model_dirs["llama"]
    params = [SamplingParams(temperature=0, max_tokens=MAX_NEW, logprobs=2),
              SamplingParams(temperature=0, max_tokens=MAX_NEW, logprob_token_ids=[9, 300, 17]),
              SamplingParams(temperature=0, max_tokens=MAX_NEW, repetition_penalty=1.3),
              SamplingParams(temperature=0, max_tokens=MAX_NEW, logit_bias={5: 3.0}),
              SamplingParams(temperature=0, max_tokens=MAX_NEW, min_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=7),
              SamplingParams(temperature=0, max_tokens=MAX_NEW, stop_token_ids=[100, 200, 300])]
    prompts = PROMPTS[:len(params)]
    plain, _ = run(d, None, prompts, params)
    for cfg in (NGRAM, draft(d)):
        spec, stats = run(d, cfg, prompts, params)
        assert stats.spec_decode.num_drafts > 0
        for a, b in zip(plain, spec):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
            assert a.outputs[0].finish_reason == b.outputs[0].finish_reason
        for i in (0, 1):   # speculating rows' logprobs: top-N, and named ids
            a, b = plain[i].outputs[0].logprobs, spec[i].outputs[0].logprobs
            assert [list(p) for p in a] == [list(p) for p in b]
            assert all(abs(x[t].logprob - y[t].logprob) < 1e-5 for x, y in zip(a, b) for t in x)


def test_seeded_sampling_reproducible(tiny_model_dirs):
    d = tiny_model_dirs["llama"]
    params = [SamplingParams(temperature=0.8, top_p=0.95, seed=i, max_tokens=MAX_NEW) for i in range(4)]
    a, _ = run(d, draft(d), PROMPTS[:4], params)
    b, _ = run(d, draft(d), PROMPTS[:4], params)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]


# low temperatures: the tiny random model's distributions are flat, and proposals must be accepted at times
@pytest.mark.parametrize("seeded", [SamplingParams(temperature=0.3, seed=7, max_tokens=MAX_NEW, ignore_eos=True),
                                    SamplingParams(temperature=0.5, top_p=0.9, seed=3, max_tokens=MAX_NEW,
                                                   ignore_eos=True)])
def test_seeded_sampling_independent_of_the_batch(tiny_model_dirs, seeded):
    """A seeded request speculates and gets the tokens it gets without speculation, alone or in a batch too
    large to speculate (the target as its own draft, so proposals are often accepted)."""
    d = tiny_model_dirs["llama"]
    plain, _ = run(d, None, PROMPTS[:1], seeded)
    alone, stats = run(d, draft(d, 2), PROMPTS[:1], seeded)
    crowd, _ = run(d, draft(d, 2), PROMPTS[:1] * 20, [seeded] + [GREEDY] * 19, max_num_seqs=32)
    assert stats.spec_decode.num_accepted_tokens > 0
    assert alone[0].outputs[0].token_ids == plain[0].outputs[0].token_ids
    assert crowd[0].outputs[0].token_ids == plain[0].outputs[0].token_ids


def test_large_batches_do_not_speculate(tiny_model_dirs):
    d = tiny_model_dirs["llama"]
    _, stats = run(d, {**NGRAM, "disable_by_batch_size": 2}, max_num_seqs=16)
    assert stats.spec_decode.num_drafts < 40   # only the tail, once few requests are left


def test_synthetic_acceptance(tiny_model_dirs):
    d = tiny_model_dirs["llama"]
    cfg = {**draft(tiny_model_dirs["qwen2"]), "rejection_sample_method": "synthetic",
           "synthetic_acceptance_rates": [0.8, 0.64, 0.512, 0.4096]}
    _, stats = run(d, cfg, PROMPTS[:4], SamplingParams(temperature=0, max_tokens=150, ignore_eos=True))
    sd = stats.spec_decode
    assert sd.num_drafts > 80
    # whether a draft happens depends only on earlier ones (the back-off): each is accepted at the given rates
    rates = [a / b for a, b in zip(sd.accepted_per_pos, [sd.num_drafts] + sd.accepted_per_pos)]
    assert all(0.65 < r < 0.95 for r in rates), rates
    assert 2.7 < sd.mean_acceptance_length < 3.7, sd


def test_demo_model_exact():
    prompts = ["Once upon a time", "The little dog", "Lily and Ben went to the park. Lily and Ben"]
    sp = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    plain = [o.outputs[0].token_ids for o in LLM(dtype="float32", log_stats_interval=0).generate(
        prompts, sp, use_tqdm=False)]
    for cfg in (NGRAM, draft(DEMO_MODEL)):
        llm = LLM(dtype="float32", log_stats_interval=0, speculative_config=cfg)
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)] == plain


@pytest.mark.parametrize("cfg, field", [
    ({"method": "eagle", "num_speculative_tokens": 2}, "method"),
    ({"method": "ngram"}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_mx": 3}, "prompt_lookup_mx"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "model"),
    ({"method": "ngram", "num_speculative_tokens": 2, "rejection_sample_method": "synthetic"},
     "synthetic_acceptance_rate"),
    ('{"method": "ngram", ', "JSON"),
    # types and paths a fuzz found raising TypeErrors or looking the path up on the Hub
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": "a"}, "prompt_lookup_min must be an int"),
    ({"method": "ngram", "num_speculative_tokens": True}, "num_speculative_tokens must be an integer"),
    ({"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": "x"}, "disable_by_batch_size"),
    ({"method": "ngram", "num_speculative_tokens": 2, "rejection_sample_method": "synthetic",
      "synthetic_acceptance_rates": 5}, "synthetic_acceptance_rates must be a list of numbers"),
    ({"method": "draft_model", "num_speculative_tokens": 2, "model": "/nonexistent"}, "an existing one"),
])
def test_config_errors_name_the_key(cfg, field):
    with pytest.raises(ValueError, match=field):
        LLM(dtype="float32", log_stats_interval=0, speculative_config=cfg)


def test_draft_vocabulary_must_match(tmp_path, tiny_model_dirs):
    from conftest import make_tiny_model
    other = make_tiny_model(tmp_path / "v600", vocab_size=600)
    with pytest.raises(ValueError, match="vocabulary"):
        LLM(tiny_model_dirs["llama"], dtype="float32", log_stats_interval=0, speculative_config=draft(other))


def test_rejected_proposals_back_off(tiny_model_dirs):
    """Synthetic acceptance 0: every proposal fails, so requests stop proposing for longer and longer: far fewer
    drafts than steps."""
    d = tiny_model_dirs["llama"]
    cfg = {**draft(d), "rejection_sample_method": "synthetic", "synthetic_acceptance_rate": 0.0}
    outputs, stats = run(d, cfg, PROMPTS[:2], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    assert stats.spec_decode.num_accepted_tokens == 0
    assert stats.spec_decode.num_drafts < 30   # of ~200 steps per request


def test_stop_strings_and_structured_rows_on_the_demo_model():
    """Stop strings cut the accepted tokens where plain decoding stops; a row under a regex (it never
    speculates) decodes in the same steps as speculating rows, exactly as without speculation."""
    import re
    regex = r"(cat|dog)-[0-9]{2,4}\.(red|blue)"
    prompts = ["Once upon a time", "The little dog", "Lily and Ben went to the park. Lily and Ben"]
    plain_llm = LLM(dtype="float32", log_stats_interval=0)
    free = plain_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=60), use_tqdm=False)
    stops = [o.outputs[0].text[20:24] for o in free]   # a stop string inside each greedy answer
    params = [SamplingParams(temperature=0, max_tokens=60, stop=[s], logprobs=1) for s in stops]
    cut = plain_llm.generate(prompts, params, use_tqdm=False)
    # max_tokens one past the stop string: a speculative step that accepts both ends by length in the core,
    # the stop string must still win (the token after it was never output one at a time)
    params += [SamplingParams(temperature=0, max_tokens=len(o.outputs[0].token_ids) + 1, stop=[s])
               for o, s in zip(cut, stops)]
    params.append(SamplingParams(temperature=0, max_tokens=30, structured_outputs={"regex": regex}))
    prompts = prompts * 2 + ["One day"]
    expected = plain_llm.generate(prompts, params, use_tqdm=False)
    for cfg in (NGRAM, draft(DEMO_MODEL)):
        llm = LLM(dtype="float32", log_stats_interval=0, speculative_config=cfg)
        got = llm.generate(prompts, params, use_tqdm=False)
        for a, b in zip(expected, got):
            a, b = a.outputs[0], b.outputs[0]
            assert (a.token_ids, a.text, a.finish_reason, a.stop_reason) == \
                (b.token_ids, b.text, b.finish_reason, b.stop_reason)
            assert (a.logprobs is None and b.logprobs is None) or len(a.logprobs) == len(b.logprobs)
        assert all(o.outputs[0].stop_reason == s for o, s in zip(got, stops * 2))
        assert re.fullmatch(regex, got[-1].outputs[0].text)
        assert llm.engine.get_stats().spec_decode.num_accepted_tokens > 0


def test_abort_mid_speculation_frees_everything(tiny_model_dirs):
    d = tiny_model_dirs["llama"]
    llm = LLM(d, dtype="float32", log_stats_interval=0, speculative_config=draft(d))
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    for i in range(3):
        engine.add_request(f"r{i}", PROMPTS[i + 3], params)
    for _ in range(6):
        engine.step()
    assert engine.get_stats().spec_decode.num_drafts > 0
    engine.abort_request(["r1"])
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert set(finished) == {"r0", "r2"}
    assert all(len(o.outputs[0].token_ids) == 200 for o in finished.values())
    stats = engine.get_stats()
    assert stats.num_blocks_free == stats.num_blocks_total


def _linear_kinds(model) -> set[str]:
    from pagedllm.layers.quantization.fp8_linear import Fp8Linear
    layer = model.model.layers[0]
    return {"fp8" if isinstance(m, Fp8Linear) else str(m.weight.dtype) for m in (layer.mlp.down_proj,
                                                                                   layer.self_attn.o_proj)}


@pytest.mark.parametrize("draft_quantization, kinds", [(None, {"torch.float32"}), ("fp8", {"fp8"})])
def test_the_drafts_quantization_is_its_own_not_the_targets(tiny_model_dirs, draft_quantization, kinds):
    """As vLLM's: --quantization fp8 quantizes the target; the draft takes speculative_config's quantization (else
    its checkpoint's). Under --quantization fp8 the draft was quantized too, and its quantization key refused."""
    d = tiny_model_dirs["llama"]
    spec = {**draft(d, k=2), "quantization": draft_quantization}
    llm = LLM(d, dtype="float32", device="cpu", log_stats_interval=0, quantization="fp8", speculative_config=spec)
    runner = llm.engine.runner
    assert _linear_kinds(runner.model) == {"fp8"}
    assert _linear_kinds(runner.draft.model) == kinds
    assert llm.engine.vllm_config.speculative_config.draft_model_config.quantization == draft_quantization
    out = llm.generate(PROMPTS[:2], SamplingParams(max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 6 for o in out)


def test_a_draft_quantization_without_a_draft_model_is_refused():
    with pytest.raises(ValueError, match="speculative_config: quantization must be None, or one of .*draft_model"):
        LLM(dtype="float32", device="cpu", speculative_config={**NGRAM, "quantization": "fp8"})
