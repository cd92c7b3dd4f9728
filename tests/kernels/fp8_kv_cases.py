"""FP8 KV cache batches and their checks: triton_backend against torch_backend on the same fp8 cache.

Shared by the GPU tests (test_fp8_kv_attention.py) and the Triton-interpreter run on CPU
(`python tests/kernels/fp8_kv_cases.py` with TRITON_INTERPRET=1). The interpreter emulates the fp32 -> fp8
cast wrongly (1.97 -> 1.0: a lost carry; ties round up), so on CPU the reshape_and_cache bytes are checked
only against the kernel itself (graph padding); on CUDA check_write_kv compares them with torch's.
"""
import random

import torch
from attention_cases import (
    check_attention,
    check_graph_padding,
    check_row_independent_of_batch,
    check_shared_prefix,
    make_batch,
    random_rows,
    shared_prefix_rows,
)

from pagedllm.attention.kv_quant import quantize

KV_SCALES = [(1.0, 1.0), (0.43, 2.7)]


def fp8_batch(rows, num_q_heads, num_kv_heads, head_dim, block_size, dtype, device, kv_scales, seed=0,
              k_range=1.0, **kw):
    """make_batch with the cache's noise (context K/V) stored as an fp8 cache holds it. k_range: this step's
    new K times it (values past 448 * k_scale test the clamp)."""
    batch = make_batch(rows, num_q_heads, num_kv_heads, head_dim, block_size, dtype, device, seed=seed, **kw)
    k_scale, v_scale = kv_scales
    noise = batch.kv_cache.float()
    batch.kv_cache = torch.stack([quantize(noise[0] * k_scale, k_scale), quantize(noise[1] * v_scale, v_scale)])
    batch.k = (batch.k.float() * k_scale * k_range).to(dtype)
    batch.v = (batch.v.float() * v_scale).to(dtype)
    return batch


def interpreter_cases():
    rng = random.Random(1)
    for i, (hq, hkv, dim, bs, dtype) in enumerate([(4, 2, 16, 16, torch.float32), (6, 2, 32, 32, torch.bfloat16)]):
        rows = random_rows(rng, 2, max_context=60, max_query=12) + [(1, 1), (0, 1), (200, 1), (40, 7)]
        rng.shuffle(rows)
        yield f"fp8-hq{hq}-hkv{hkv}-d{dim}-{str(dtype)[6:]}", rows, (hq, hkv, dim, bs, dtype), KV_SCALES[i % 2], i


def run_interpreter() -> None:
    from attention_cases import _patch_interpreter

    from pagedllm.attention import triton_backend
    _patch_interpreter()
    triton_backend.PARTITION, triton_backend.MAX_SEGMENTS, triton_backend.SMALL_BATCH_PARTITION = 64, 4, 32
    for name, rows, shape, scales, seed in interpreter_cases():
        batch = fp8_batch(rows, *shape, "cpu", scales, seed=seed)
        err = check_attention(batch, triton_backend, kv_scales=scales)
        decode_row = next(i for i, (s, q) in enumerate(rows) if q == 1 and s > 0)
        check_row_independent_of_batch(batch, triton_backend, decode_row, kv_scales=scales)
        check_graph_padding(batch, triton_backend, kv_scales=scales)
        rows, shared = shared_prefix_rows(random.Random(seed), 2 * 64, groups=1, per_group=3, block_size=shape[3])
        check_shared_prefix(fp8_batch(rows, *shape, "cpu", scales, seed=seed, shared=shared), triton_backend,
                            shape[3], kv_scales=scales)
        print(f"ok {name} rel_err={err:.1e}", flush=True)


if __name__ == "__main__":
    run_interpreter()
