"""Beam search's copy-on-write forks on CUDA: the block copy (every layer's K and V; fp8 as bytes) on the device,
float32 beams equal to the CPU path's, fp8 KV caches and the KV tiers' copy stream, and no block left behind."""
import gc

import pytest
import torch

from pagedllm import LLM, BeamSearchParams
from pagedllm.layers.quantization.fp8 import FP8
from pagedllm.runner.kv_offload import copy_blocks

pytestmark = pytest.mark.gpu

PROMPTS = [[5 + (7 * i) % 300 for i in range(n)] for n in (3, 21, 40, 77)]
PARAMS = BeamSearchParams(beam_width=4, max_tokens=24, ignore_eos=True)
# Blocks a pool (plenty for 4 prompts x 4 beams): a tiny model's cache sized by the H200's memory has tens of
# millions of blocks, whose Python objects took over 45 s to build with an fp8 cache.
POOL = 2048


@pytest.fixture(autouse=True)
def _free_gpu_memory():
    gc.collect()
    torch.cuda.empty_cache()


def _beams(llm):
    out = llm.beam_search(PROMPTS, PARAMS)
    stats, forks = llm.engine.get_stats(), llm.engine.kv_cache_manager.forks
    assert stats.num_blocks_free == stats.num_blocks_total and not forks.holds
    assert forks.stats.num_forks > 0 and forks.stats.num_block_copies > 0
    return out


def _unforked(llm):
    """The same engine without holds: every beam shares full blocks and recomputes its partial one."""
    llm.engine.kv_cache_manager.forks.can_hold = lambda request: False
    return llm


def _assert_same(a, b, tol):
    for x, y in zip(a, b):
        assert [s.tokens for s in x.sequences] == [s.tokens for s in y.sequences]
        assert max(abs(s.score - t.score) for s, t in zip(x.sequences, y.sequences)) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, FP8])
def test_copy_blocks_on_cuda(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    caches = [torch.randn((2, 64, 16, 8, 128), generator=g, device="cuda").to(dtype) for _ in range(4)]
    want = [c.clone() for c in caches]
    for w in want:
        w[:, [40, 41, 7]] = w[:, [3, 5, 9]]
    copy_blocks(caches, [(3, 40), (5, 41), (9, 7)])
    torch.cuda.synchronize()
    for c, w in zip(caches, want):
        assert torch.equal(c.view(torch.uint8), w.view(torch.uint8))


def test_float32_forked_beams_on_cuda_match_cpu(tiny_model_dirs):
    d = tiny_model_dirs["llama"]
    cpu = LLM(d, device="cpu", dtype="float32", log_stats_interval=0).beam_search(PROMPTS, PARAMS)
    _assert_same(cpu, _beams(LLM(d, device="cuda", dtype="float32", log_stats_interval=0,
                                                  num_gpu_blocks_override=POOL)), 1e-4)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_forked_beams_match_unforked_on_cuda(tiny_model_dirs, kv_cache_dtype):
    """bf16 and fp8 caches: forked beams against the recompute path (tiny models: ties are far apart)."""
    d = tiny_model_dirs["qwen3"]
    kw = dict(device="cuda", dtype="bfloat16", kv_cache_dtype=kv_cache_dtype, log_stats_interval=0,
              num_gpu_blocks_override=POOL)
    ref = _unforked(LLM(d, **kw)).beam_search(PROMPTS, PARAMS)
    _assert_same(ref, _beams(LLM(d, **kw)), 2e-2)


def test_forks_beside_the_kv_tiers_copy_stream(tiny_model_dirs):
    """Fork copies run between the tier copies' gathers and loads (runner/kv_offload.py): a small pool with a
    CPU tier (holds dropped for room evict cached blocks to it; later beams load them back in the same steps
    as forks copy), against the float32 beams of a roomy engine."""
    d = tiny_model_dirs["llama"]
    ref = LLM(d, device="cuda", dtype="float32", log_stats_interval=0).beam_search(PROMPTS, PARAMS)
    gc.collect()
    llm = LLM(d, device="cuda", dtype="float32", log_stats_interval=0, num_gpu_blocks_override=40, block_size=4,
              max_num_seqs=16, max_num_batched_tokens=32, preemption_mode="swap", swap_space=0.01,
              kv_offloading_size=0.01)
    _assert_same(ref, _beams(llm), 1e-4)
    assert llm.engine.get_stats().kv_tiers["cpu"].hits > 0
