"""Attention kernel micro-benchmark on one GPU: the Triton backend vs the torch backend (and, for prefill,
vs F.scaled_dot_product_attention on contiguous K/V: a non-paged lower bound), with a correctness line each.

    PYTHONPATH=$PWD python3 benchmarks/attention_kernels.py [--sweep] [--kv-cache-dtype fp8] [--only decode]
        [--sliding-window 4096] [--soft-cap 50]

Times are medians of triton.testing.do_bench (CUDA events). Decode reports the KV bytes read per second,
prefill the attention TFLOP/s (causal: only the visible half of QK^T and PV is counted). --sweep also
times other tile configs of the Triton kernels and prints the fastest per shape. --sliding-window / --soft-cap
also time the Triton kernels as such a layer runs them (Gemma 2: 4096, 50), checked against window_cases'
dense reference; the figures stay those of the full context.
"""
import argparse
import dataclasses
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.runtime.errors import OutOfResources
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kernels"))
from attention_cases import make_batch, rel_error
from window_cases import reference

from pagedllm.attention import torch_backend, triton_backend

DECODE_CONFIGS = [(64, 4, 2), (32, 4, 3), (64, 8, 3), (32, 4, 2), (128, 8, 2), (16, 4, 4)]
PREFILL_CONFIGS = [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 8, 3), (64, 32, 4, 2)]


def shapes(rng: random.Random):
    """(name, rows (seq_len, query_len), Hq, Hkv, kind)."""
    yield "W1 decode 256 x U(100,2000) Qwen3-0.6B", [(rng.randint(100, 2000), 1) for _ in range(256)], 16, 8, "decode"
    yield "long decode 4 x 32k Qwen3-0.6B", [(32768, 1)] * 4, 16, 8, "decode"
    yield "W1 decode 32 x U(100,2000) Qwen3-0.6B", [(rng.randint(100, 2000), 1) for _ in range(32)], 16, 8, "decode"
    lens = [2048, 1536, 1024, 1024, 768, 1280, 512]            # 8192 tokens of 7 fresh prompts
    yield "W2 prefill chunk 8192 tok / 7 prompts Llama-8B", [(n, n) for n in lens], 32, 8, "prefill"
    yield "W3 prefix hit 16 x (2000 cached + 100) Llama-8B", [(2100, 100)] * 16, 32, 8, "prefill"


def kv_bytes(rows, hkv, head_dim, dtype) -> float:
    return sum(s for s, _ in rows) * hkv * head_dim * 2 * dtype.itemsize


def attention_flops(rows, hq, head_dim) -> float:
    """2 matmuls x 2 flops x visible (query, key) pairs x head_dim x heads."""
    pairs = sum(q * (s - q) + q * (q + 1) / 2 for s, q in rows)
    return 4 * pairs * head_dim * hq


def sdpa_contiguous(batch, rows, hq):
    """Fresh prompts only: F.scaled_dot_product_attention (flash) per prompt on contiguous (1, Hq, L, D)
    tensors, K/V heads already repeated for GQA."""
    starts = batch.meta.query_start_loc_cpu

    def heads_first(x, i):
        x = x[starts[i]:starts[i + 1]].repeat_interleave(hq // x.shape[1], dim=1)
        return x.transpose(0, 1).contiguous()[None]
    qkv = [[heads_first(x, i) for x in (batch.q, batch.k, batch.v)] for i in range(len(rows))]

    def run():
        for q, k, v in qkv:
            F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return run


def bench_shape(name, rows, hq, hkv, kind, sweep: bool, head_dim=128, dtype=torch.bfloat16, kv_fp8=False,
                layer=None):
    batch = make_batch(rows, hq, hkv, head_dim, 16, dtype, "cuda", seed=0)
    if kv_fp8:   # the same cache in float8_e4m3 (scales 1.0): half the bytes to read
        batch = dataclasses.replace(batch, kv_cache=batch.kv_cache.float().clamp(-448, 448).to(torch.float8_e4m3fn))
    scale = head_dim ** -0.5
    triton_backend.write_kv(batch.kv_cache, batch.k, batch.v, batch.meta.slot_mapping)
    ref = torch_backend.paged_attention(batch.q, batch.kv_cache, batch.ref_meta, scale)
    out = triton_backend.paged_attention(batch.q, batch.kv_cache, batch.meta, scale)
    err = rel_error(out, ref)
    tol = 1e-2
    print(f"\n{name}: {len(rows)} rows, {batch.q.shape[0]} query tokens, {sum(s for s, _ in rows)} context tokens")
    print(f"  correctness: rel err vs torch {err:.2e} ({'OK' if err <= tol and torch.isfinite(out).all() else 'FAIL'})")

    def fig(ms):
        if kind == "decode":
            return f"{kv_bytes(rows, hkv, head_dim, batch.kv_cache.dtype) / ms / 1e6:8.1f} GB/s KV read"
        return f"{attention_flops(rows, hq, head_dim) / ms / 1e9:8.1f} TFLOP/s"

    ms = do_bench(lambda: triton_backend.paged_attention(batch.q, batch.kv_cache, batch.meta, scale),
                  return_mode="median")
    print(f"  triton       {ms * 1e3:9.1f} us  {fig(ms)}")
    if layer:
        bench_layer(batch, scale, layer)
    ms_torch = do_bench(lambda: torch_backend.paged_attention(batch.q, batch.kv_cache, batch.ref_meta, scale),
                        warmup=5, rep=50, return_mode="median")
    print(f"  torch        {ms_torch * 1e3:9.1f} us  {fig(ms_torch)}  (triton {ms_torch / ms:.1f}x faster)")
    if kind == "prefill" and all(s == q for s, q in rows):
        ms_sdpa = do_bench(sdpa_contiguous(batch, rows, hq), return_mode="median")
        print(f"  sdpa contig  {ms_sdpa * 1e3:9.1f} us  {fig(ms_sdpa)}  (non-paged lower bound)")
    if kind == "prefill":
        ms_w = do_bench(lambda: triton_backend.write_kv(batch.kv_cache, batch.k, batch.v, batch.meta.slot_mapping),
                        return_mode="median")
        print(f"  write_kv     {ms_w * 1e3:9.1f} us  ({batch.q.shape[0]} tokens)")
    if sweep:
        sweep_configs(batch, kind, scale, fig)


def bench_layer(batch, scale, layer):
    """The same step through a layer with a sliding window and / or a soft cap."""
    out = triton_backend.paged_attention(batch.q, batch.kv_cache, batch.meta, scale, **layer)
    ref = reference(batch.q, batch.kv_cache, batch.ref_meta, scale, layer["sliding_window"], layer["soft_cap"])
    err = rel_error(out, ref)
    ms = do_bench(lambda: triton_backend.paged_attention(batch.q, batch.kv_cache, batch.meta, scale, **layer),
                  return_mode="median")
    ok = "OK" if err <= 1e-2 and torch.isfinite(out).all() else "FAIL"
    print(f"  triton layer {ms * 1e3:9.1f} us  window {layer['sliding_window']}, cap {layer['soft_cap']} "
          f"(rel err vs dense reference {err:.2e}, {ok})")


def sweep_configs(batch, kind, scale, fig):
    name = "_decode_config" if kind == "decode" else "_prefill_config"
    original = getattr(triton_backend, name)
    results = []
    try:
        for config in (DECODE_CONFIGS if kind == "decode" else PREFILL_CONFIGS):
            setattr(triton_backend, name, lambda dtype, head_dim, c=config: c)
            try:
                ms = do_bench(lambda: triton_backend.paged_attention(batch.q, batch.kv_cache, batch.meta, scale),
                              return_mode="median")
            except OutOfResources as e:   # a config this GPU cannot run (shared memory): go on
                print(f"    {config}: {type(e).__name__}")
                continue
            results.append((ms, config))
            print(f"    {config}: {ms * 1e3:8.1f} us  {fig(ms)}")
    finally:
        setattr(triton_backend, name, original)
    best = min(results)
    print(f"  best {name[1:]} {best[1]}: {best[0] * 1e3:.1f} us")
    if kind == "decode":
        default = triton_backend.PROGRAMS_PER_SM
        try:
            for per_sm in (2, 4, 16, 32):
                triton_backend.PROGRAMS_PER_SM = per_sm
                ms = do_bench(lambda: triton_backend.paged_attention(batch.q, batch.kv_cache, batch.meta, scale),
                              return_mode="median")
                print(f"    PROGRAMS_PER_SM={per_sm}: {ms * 1e3:8.1f} us  {fig(ms)}")
        finally:
            triton_backend.PROGRAMS_PER_SM = default


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time other tile configs")
    parser.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto", help="fp8: an fp8 cache")
    parser.add_argument("--only", choices=("decode", "prefill"), default=None, help="only these shapes")
    parser.add_argument("--sliding-window", type=int, default=None, help="also time a layer with this window")
    parser.add_argument("--soft-cap", type=float, default=None, help="also time a layer with this logit cap")
    args = parser.parse_args()
    layer = None
    if args.sliding_window or args.soft_cap:
        layer = dict(sliding_window=args.sliding_window, soft_cap=args.soft_cap)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    rng = random.Random(0)
    for name, rows, hq, hkv, kind in shapes(rng):
        if args.only in (None, kind):
            bench_shape(name, rows, hq, hkv, kind, args.sweep, kv_fp8=args.kv_cache_dtype == "fp8", layer=layer)


if __name__ == "__main__":
    main()
