"""FP8 KV cache: triton_backend against torch_backend on the same fp8 cache (fresh random inputs, non-1.0
scales, bf16 / fp16 / fp32 queries, GQA, head dims 64 and 128), on CUDA; on CPU through the Triton interpreter
in a subprocess. Then an engine on CUDA: fp8-KV greedy tokens with CUDA graphs equal eager ones."""
import random

import pytest
import torch
from attention_cases import (
    check_attention,
    check_graph_padding,
    check_row_independent_of_batch,
    check_shared_prefix,
    check_write_kv,
    random_rows,
    shared_prefix_rows,
)
from fp8_kv_cases import KV_SCALES, fp8_batch
from kernel_checks import run_under_interpreter

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
HEADS = [(16, 8), (32, 8), (8, 1)]      # Qwen3-0.6B, Llama-3.1-8B, MQA


def test_fp8_kernels_under_triton_interpreter():
    pytest.importorskip("triton")
    stdout = run_under_interpreter("fp8_kv_cases.py", timeout=600)
    assert stdout.count("ok ") == 2, stdout


def _triton():
    from pagedllm.attention import triton_backend
    return triton_backend


@pytest.mark.gpu
@pytest.mark.parametrize("kv_scales", KV_SCALES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reshape_and_cache_writes_torch_bytes(dtype, kv_scales):
    """Same fp8 bytes as torch_backend.write_kv, new K up to 2000x its scale (clamped to 448), padding -1."""
    rng = random.Random(hash((str(dtype), kv_scales)) & 0xFFFF)
    rows = random_rows(rng, 40, max_context=300, max_query=100) + [(0, 1), (0, 1)]
    batch = fp8_batch(rows, 16, 8, 128, 16, dtype, "cuda", kv_scales, seed=rng.randrange(1 << 16), k_range=400.0)
    check_write_kv(batch, _triton(), kv_scales)
    cache = batch.kv_cache.clone()
    _triton().write_kv(cache, batch.k, batch.v, batch.meta.slot_mapping, *kv_scales)
    assert torch.isfinite(cache.float()).all() and cache[0].float().abs().max() == 448


@pytest.mark.gpu
@pytest.mark.parametrize("kv_scales", KV_SCALES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", HEADS, ids=str)
@pytest.mark.parametrize("head_dim,block_size", [(128, 16), (64, 32)])
def test_mixed_batch_matches_torch(dtype, heads, head_dim, block_size, kv_scales):
    """Decode (split-KV), fresh prefill, chunks after cached context, padding; graph padding bit-identical."""
    rng = random.Random(hash((str(dtype), heads, head_dim, block_size, kv_scales)) & 0xFFFF)
    rows = random_rows(rng, 24, max_context=700, max_query=150)
    rows += [(1, 1), (0, 1), (2500, 1), (300, 300), (1200, 100)]
    rng.shuffle(rows)
    batch = fp8_batch(rows, *heads, head_dim, block_size, dtype, "cuda", kv_scales, seed=rng.randrange(1 << 16))
    check_write_kv(batch, _triton(), kv_scales)
    check_attention(batch, _triton(), kv_scales=kv_scales)
    check_graph_padding(batch, _triton(), kv_scales=kv_scales)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_scales", KV_SCALES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_long_decode_rows_split_kv(dtype, kv_scales):
    """Long rows: many segments, and rows longer than PARTITION * MAX_SEGMENTS; batch-independent rows."""
    rows = [(33000, 1), (16385, 1), (513, 1), (0, 1), (70000, 1)]
    batch = fp8_batch(rows, 16, 8, 128, 16, dtype, "cuda", kv_scales, seed=5)
    check_attention(batch, _triton(), kv_scales=kv_scales)
    check_row_independent_of_batch(batch, _triton(), row=0, kv_scales=kv_scales)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("head_dim", [128, 64])
def test_large_prefill_chunks(monkeypatch, dtype, head_dim):
    """Fresh prompts and chunks after long cached context, with the cuDNN path on (Hopper: rows of 1,024+ new
    tokens go there, their fp8 K/V widened; elsewhere they stay on Triton) and off."""
    from pagedllm.attention import cudnn_prefill
    rows = [(2048, 2048), (2100, 100), (4000, 1900), (1024, 1024), (600, 1), (2500, 2500)]
    batch = fp8_batch(rows, 32, 8, head_dim, 16, dtype, "cuda", KV_SCALES[1], seed=6)
    monkeypatch.setattr(cudnn_prefill, "MIN_PAIRS", 0)
    for enabled in (True, False):
        monkeypatch.setattr(cudnn_prefill, "ENABLED", enabled)
        check_attention(batch, _triton(), kv_scales=KV_SCALES[1])


@pytest.mark.gpu
@pytest.mark.parametrize("kv_scales", KV_SCALES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", HEADS, ids=str)
@pytest.mark.parametrize("head_dim", [128, 64])
def test_shared_prefix_segments(dtype, heads, head_dim, kv_scales):
    """Cascade: groups of decode rows behind 2,000-token prefixes read once, beside rows of every kind."""
    rows, shared = shared_prefix_rows(random.Random(11), 2000, groups=3, per_group=21, block_size=16)
    batch = fp8_batch(rows, *heads, head_dim, 16, dtype, "cuda", kv_scales, seed=11, shared=shared)
    check_shared_prefix(batch, _triton(), 16, kv_scales=kv_scales)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_engine_cuda_graphs_equal_eager_fp8_kv(tmp_path, monkeypatch, arch):
    """A tiny bf16 model with an fp8 KV cache (scales 0.5 / 2.0 on every layer, set at construction as a
    checkpoint's would be at load: graphs capture them): greedy tokens with CUDA graphs equal eager ones."""
    import numpy as np
    from conftest import make_tiny_model

    from pagedllm import LLM, SamplingParams
    from pagedllm.layers.attention import Attention
    init = Attention.__init__

    def with_scales(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.k_scale, self.v_scale = 0.5, 2.0
    monkeypatch.setattr(Attention, "__init__", with_scales)
    d = make_tiny_model(tmp_path / arch, arch=arch, seed=3)
    prompts = [np.random.default_rng(i).integers(3, 512, size=n).tolist() for i, n in enumerate([5, 40, 130, 77])]
    params = SamplingParams(temperature=0.0, max_tokens=40)
    outs = []
    for eager in (True, False):
        llm = LLM(d, dtype="bfloat16", kv_cache_dtype="fp8", enforce_eager=eager, log_stats_interval=0,
                  gpu_memory_utilization=0.2)   # a share: an engine a failed test leaves alive must not starve it
        assert llm.engine.runner.kv_caches[0].dtype == torch.float8_e4m3fn
        outs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
        del llm
        torch.cuda.empty_cache()
    assert outs[0] == outs[1]


def test_attention_kernels_compile_for_hopper():
    """Without a GPU: the decode, prefill and shared-prefix kernels through Triton's compiler and ptxas for sm_90
    (the interpreter checks the math only), bf16 and fp16 queries over their own cache and over an fp8 one
    (attend_tile's load_kv_tile, dot_q's fp16 dots), at the tiles triton_backend launches; no register spills.
    bf16 queries also with a sliding window and a soft cap (Gemma 2's 4,096 and 50; the compiler refuses what the
    interpreter lets pass, e.g. an `if` on a float), and there decode_qkv with Gemma 3's (1 + weight) q/k norms."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pagedllm.attention.kernels.decode_partition import decode_partition_kernel
    from pagedllm.attention.kernels.prefill_attention import prefill_attention_kernel
    from pagedllm.attention.kernels.shared_prefix import shared_prefix_kernel
    from pagedllm.attention.triton_backend import MAX_SEGMENTS, PARTITION, _decode_config
    common = dict(HEAD_DIM=128, HEAD_PAD=128, BLOCK_SIZE=16, PRECISION="tf32")
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8e4nv": torch.float8_e4m3fn}
    for q_dt, layer in (("bf16", dict(WINDOW=0, SOFT_CAP=0.0)), ("fp16", dict(WINDOW=0, SOFT_CAP=0.0)),
                        ("bf16", dict(WINDOW=4096, SOFT_CAP=50.0))):
        for cache_dt in (q_dt, "fp8e4nv"):
            tile_n, decode_warps, _ = _decode_config(dtypes[q_dt], dtypes[cache_dt], 128)
            decode = dict(GROUP=2, BLOCK_M=16, TILE_N=tile_n, PARTITION=PARTITION, MAX_SEGMENTS=MAX_SEGMENTS,
                          HAS_SHARED=False, ROPE=False, HAS_NORM=False, UNIT_OFFSET=False, NUM_Q_HEADS=0,
                          NUM_KV_HEADS=0, **layer)
            gemma = layer["WINDOW"] > 0   # the Gemma-like layer's q/k norms are Gemma's
            cases = [(decode_partition_kernel, decode, decode_warps),
                     (decode_partition_kernel, {**decode, "ROPE": True, "HAS_NORM": True, "UNIT_OFFSET": gemma,
                                                "NUM_Q_HEADS": 16, "NUM_KV_HEADS": 8}, decode_warps),   # decode_qkv
                     (prefill_attention_kernel, dict(GROUP=2, GROUP_PAD=2, BLOCK_Q=32, TILE_N=64, **layer), 4),
                     (shared_prefix_kernel, dict(GROUP=2, GROUP_PAD=2, ROWS=32, TILE_N=tile_n,
                                                 PARTITION=PARTITION, SOFT_CAP=layer["SOFT_CAP"]), 4)]
            for fn, consts, warps in cases:
                consts = {**common, **consts}
                sig = {}
                for name in fn.arg_names:
                    assert not name.isupper() or name in consts, f"{fn.__name__}: constant {name} not given"
                    if name in consts:
                        sig[name] = "constexpr"
                    elif name in ("k_cache_ptr", "v_cache_ptr"):
                        sig[name] = f"*{cache_dt}"
                    elif name in ("q_ptr", "out_ptr", "q_w_ptr", "k_w_ptr"):
                        sig[name] = f"*{q_dt}"
                    elif name.startswith(("part_out", "part_max", "part_sum", "cos_sin")):
                        sig[name] = "*fp32"
                    elif name in ("slot_ptr", "pos_ptr"):
                        sig[name] = "*i64"
                    elif name.endswith("_ptr"):
                        sig[name] = "*i32"
                    elif name in ("scale_log2", "v_scale", "q_eps", "k_eps", "k_inv", "v_inv"):
                        sig[name] = "fp32"
                    else:
                        sig[name] = "i32"
                src = ASTSource(fn=fn, signature=sig, constexprs=consts)
                compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
                assert "ld.local" not in compiled.asm["ptx"], f"{fn.__name__} {q_dt}/{cache_dt}: registers spill"
