"""Speculative decoding on CUDA (CUDA graphs on: the target's mixed graphs verify, the draft's decode graphs
propose): greedy tokens equal those without speculation for both proposers, and the rejection sampler runs
without a device sync."""
import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.sample.sampler import SamplingMetadata, position_seed
from pagedllm.spec_decode.rejection_sampler import rejection_sample

pytestmark = pytest.mark.gpu
PARAMS = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)


def _tokens(model_dir, prompts, spec=None):
    llm = LLM(model_dir, device="cuda", dtype="float32", num_gpu_blocks_override=512, log_stats_interval=0,
              max_num_seqs=8, speculative_config=spec)
    outs = [o.outputs[0].token_ids for o in llm.generate(prompts, PARAMS, use_tqdm=False)]
    stats = llm.engine.get_stats()
    assert stats.num_blocks_free == stats.num_blocks_total
    return outs, stats.spec_decode


@pytest.mark.parametrize("method", ["ngram", "self_draft", "other_draft"])
def test_greedy_equal_with_speculation_on_cuda(tiny_model_dirs, method):
    d = tiny_model_dirs["llama"]
    prompts = [[5, 6, 7, 8, 5, 6, 7], list(range(3, 40)), [9] * 20, [11, 12]]
    plain, _ = _tokens(d, prompts)
    spec = {"ngram": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1},
            "self_draft": {"method": "draft_model", "model": d, "num_speculative_tokens": 4},
            "other_draft": {"method": "draft_model", "model": tiny_model_dirs["qwen2"], "num_speculative_tokens": 4},
            }[method]
    outs, sd = _tokens(d, prompts, spec)
    assert outs == plain
    assert sd.num_drafts > 0
    if method == "self_draft":
        assert sd.num_accepted_tokens == sd.num_draft_tokens


@pytest.mark.parametrize("synthetic", [False, True])
def test_prepass_on_cuda(tiny_model_dirs, monkeypatch, synthetic):
    """The draft's passes behind the verify (DraftModel.prepass, from the draft's decode graphs): with the
    target as its own draft, outputs equal plain decoding (all accepted, or under synthetic rejections), the
    pre-pass serves most rows, and launching it never waits for the device."""
    from pagedllm.spec_decode.draft_model import DraftModel
    prepass, prepass_depth, served = DraftModel.prepass, DraftModel._prepass_depth, []

    def no_sync_prepass(self, *a, **kw):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return prepass(self, *a, **kw)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    def spy(self, pre, rows):
        depth = prepass_depth(self, pre, rows)
        served.append((sum(d > 0 for d in depth), len(rows)))
        return depth
    monkeypatch.setattr(DraftModel, "prepass", no_sync_prepass)
    monkeypatch.setattr(DraftModel, "_prepass_depth", spy)
    d = tiny_model_dirs["llama"]
    prompts = [list(range(3, 40)), [9] * 20]
    plain, _ = _tokens(d, prompts)
    spec = {"method": "draft_model", "model": d, "num_speculative_tokens": 4}
    if synthetic:
        spec.update(rejection_sample_method="synthetic", synthetic_acceptance_rates=[0.8, 0.64, 0.512, 0.4096])
    outs, sd = _tokens(d, prompts, spec)
    assert outs == plain
    assert sum(a for a, _ in served) > sum(b for _, b in served) / 2, served
    assert (sd.num_accepted_tokens < sd.num_draft_tokens) == synthetic


def test_rejection_sampler_does_not_sync():
    g = torch.Generator(device="cuda").manual_seed(0)
    num_draft = [4, 2, 3]
    logits = torch.randn(sum(num_draft) + 3, 151936, device="cuda")
    drafts = torch.randint(0, 151936, (sum(num_draft),), device="cuda")
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, top_p=0.9, seed=3),
              SamplingParams(temperature=1.0)]
    meta = SamplingMetadata.build(params, [None, 3, None], [[]] * 3, "cuda")
    # the seeded row's positions, as the runner builds them (ModelRunner._position_metadata)
    per_position = [(p, None if p.seed is None else position_seed(p.seed, j)) for p, s in zip(params, num_draft)
                    for j in range(s + 1)]
    positions = SamplingMetadata.build([p for p, _ in per_position], [x for _, x in per_position],
                                       [[]] * len(per_position), "cuda")
    rejection_sample(logits, num_draft, drafts, meta, g, position_meta=positions)   # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = rejection_sample(logits, num_draft, drafts, meta, g, position_meta=positions)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    emitted = out.num_emitted.tolist()
    assert all(1 <= n <= s + 1 for n, s in zip(emitted, num_draft))
    assert out.output_token_ids[0, emitted[0] - 1].item() == logits[emitted[0] - 1].argmax().item()
