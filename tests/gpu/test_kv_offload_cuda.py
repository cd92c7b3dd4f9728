"""KV tier copies on CUDA: pinned CPU pool, copy stream and events; the engine's preemption modes there."""
import numpy as np
import pytest
import torch
from transformers import LlamaConfig

from pagedllm import LLM, SamplingParams
from pagedllm.config import EngineConfig
from pagedllm.core.messages import DiskOp, KVTransfers
from pagedllm.runner.kv_cache import allocate_kv_caches, bytes_per_block
from pagedllm.runner.kv_offload import KVOffload, get_kv_from_block

pytestmark = pytest.mark.gpu


def test_swap_cpu_tier_and_disk_copies_on_cuda(tmp_path):
    layers, blocks, bs, heads, dim = 4, 64, 16, 8, 128
    caches, block_bytes = _noisy_caches(tmp_path, layers, blocks, bs, heads, dim)
    config = EngineConfig(model=str(tmp_path), block_size=bs, preemption_mode="swap",
                          swap_space=32 * block_bytes / 2**30, kv_offloading_size=32 * block_bytes / 2**30,
                          kv_disk_dir=str(tmp_path / "disk"), load_format="dummy")
    off = KVOffload(config, LlamaConfig.from_pretrained(tmp_path), caches, block_bytes)
    assert off.pool.is_pinned()
    src = list(range(0, 40, 2))
    before = get_kv_from_block(caches, src).clone()
    off.execute(KVTransfers(swap_out=[(b, i) for i, b in enumerate(src[:10])],
                            cpu_store=[(b, 40 + i) for i, b in enumerate(src[10:])],
                            disk_ops=[DiskOp(b"d" * 32, gpu_block=src[0])]))
    for c in caches:     # on the compute stream: must run after the copy stream read the blocks
        c.zero_()
    dst = list(range(63, 43, -1))
    off.execute(KVTransfers(swap_in=[(i, b) for i, b in enumerate(dst[:10])],
                            cpu_load=[(40 + i, b) for i, b in enumerate(dst[10:])]))
    assert torch.equal(get_kv_from_block(caches, dst), before)
    off.flush()
    result = off.execute(KVTransfers(disk_reads=[(b"d" * 32, 63)]))
    assert not result.failed_reads and torch.equal(off.pool[63].cuda(), before[0])


@pytest.mark.parametrize("mode", ["swap", "offload"])
def test_preemption_modes_on_cuda_match_recompute(tiny_model_dirs, tmp_path, mode):
    d = tiny_model_dirs["llama"]
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 512, size=n).tolist() for n in (30, 45, 20, 60, 33, 50)]
    params = SamplingParams(temperature=0, max_tokens=32)
    kw = {"device": "cuda", "dtype": "float32", "log_stats_interval": 0, "block_size": 8,
          "num_gpu_blocks_override": 14, "enable_prefix_caching": False}
    ref = LLM(d, **kw).generate(prompts, params, use_tqdm=False)
    extra = {"swap_space": 0.01} if mode == "swap" else {"kv_offloading_size": 0.01, "kv_disk_dir": str(tmp_path)}
    llm = LLM(d, preemption_mode=mode, **kw, **extra)
    out = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in ref]
    stats = llm.engine.get_stats()
    assert stats.num_preemptions > 0 and sum(t.hits for t in stats.kv_tiers.values()) > 0


def test_one_step_storing_and_loading_the_same_blocks(tmp_path, monkeypatch):
    """A returning conversation's step: its loads go into the very GPU blocks its stores evict (a permutation
    of them), and one load reads a slot this step stores into. Many chunks."""
    from pagedllm.runner import kv_offload
    monkeypatch.setattr(kv_offload, "COPY_CHUNK_BLOCKS", 8)
    layers, blocks, bs, heads, dim, n = 4, 300, 16, 8, 128, 200
    caches, block_bytes = _noisy_caches(tmp_path, layers, blocks, bs, heads, dim)
    config = EngineConfig(model=str(tmp_path), block_size=bs, kv_offloading_size=(2 * n + 8) * block_bytes / 2**30,
                          load_format="dummy")
    off = KVOffload(config, LlamaConfig.from_pretrained(tmp_path), caches, block_bytes)
    off.pool[:n].normal_()                                 # the history, stored in earlier steps
    gen = torch.Generator().manual_seed(0)
    evicted = torch.randperm(blocks, generator=gen)[:n].tolist()
    other = next(b for b in range(blocks) if b not in evicted)
    target = [evicted[i] for i in torch.randperm(n, generator=gen).tolist()]
    gpu_before, pool_before = get_kv_from_block(caches, evicted).clone(), off.pool[:n].clone()
    off.execute(KVTransfers(cpu_store=[(b, n + i) for i, b in enumerate(evicted)],
                            cpu_load=[(i, b) for i, b in enumerate(target)] + [(n + 7, other)]))
    torch.cuda.synchronize()
    assert torch.equal(off.pool[n:2 * n].cuda(), gpu_before)          # stores read the blocks before the loads
    assert torch.equal(get_kv_from_block(caches, target), pool_before.cuda())
    assert torch.equal(get_kv_from_block(caches, other), gpu_before[7])   # a slot stored, then loaded


def _noisy_caches(tmp_path, layers, blocks, bs, heads, dim):
    """bf16 KV caches of noise on CUDA, their block size in bytes, and a Llama config of that shape in tmp_path."""
    caches = allocate_kv_caches(layers, blocks, bs, heads, dim, torch.bfloat16, torch.device("cuda"))
    for c in caches:
        c.normal_()
    LlamaConfig(hidden_size=heads * 2 * dim, num_attention_heads=heads * 2, num_key_value_heads=heads,
                num_hidden_layers=layers).to_json_file(tmp_path / "config.json")
    return caches, bytes_per_block(layers, bs, heads, dim, torch.bfloat16)
