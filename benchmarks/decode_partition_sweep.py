"""Decode attention's segment length from batch 1 to W1 and W4 (issue 16: at batch 1 a 1,000-token row had 2
segments of 512 a kv head, 16 programs on 132 SMs; decode_partition took 16.3 us a layer on an H100, 30% of the
draft's pass). Each length p is set as both triton_backend.PARTITION and SMALL_BATCH_PARTITION, so every step
below runs at p. Device time of one call, from a CUDA graph of 20 calls; bf16 cache, head_dim 128.

H100 (session 38), us at 512 / 256 / 128: W5 target 1 x 1000 (32/8 heads) 15.4 / 10.0 / 7.6; W5 draft (16/8)
16.5 / 10.9 / 8.3; verify 5 x 1000 16.9 / 12.7 / 10.9; 8 x 2000 31.6 / 30.5 / 31.7; W1's 32 rows 66.8 / 62.4 /
63.6; W1's 256 rows 393.7 / 402.8 / 418.8; 4 x 32k and 32 x 30k unchanged (their rows are cut into 32 longer
segments either way). W1 end to end at 128: 18,424 / 18,489 tok/s against 18,996 / 19,132 at 512 (-3.2%); W5
(8B target, 0.6B draft) off 6.612 against 6.918 ms/token, speculating 3.911 against 4.343. Hence 128 for
decode-only steps of at most triton_backend.SMALL_BATCH_ROWS rows, 512 for the rest.

    PYTHONPATH=$PWD python3 benchmarks/decode_partition_sweep.py [512 256 128]
    PYTHONPATH=$PWD python3 benchmarks/decode_partition_sweep.py --shared

--shared: small decode-only steps whose rows share their context's blocks (a speculative verify: k + 1 rows of
one request; parallel sampling: n rows of one prompt), each timed as the engine can run it: with the shared
prefix plan (shared_prefix reads the shared 512-token segments once, then decode_partition at 512) or without
(decode_partition at SMALL_BATCH_PARTITION, every row reads its whole context). H100 (session 39), us a layer,
shared / per row: verify 5 x 1,000 (32/8 heads) 28.2 / 9.7; 5 x 6,000 30.6 / 31.2; 5 x 8,000 33.5 / 39.2;
n=8 x 3,000 (16/8) 29.6 / 24.9; n=8 x 4,000 29.0 / 31.8; n=4 x 8,000 32.5 / 30.2. The plan costs ~28-33 us
whatever the context; per row costs with the sum of the rows' contexts, even at ~30,000 tokens: hence
triton_backend.SMALL_BATCH_SHARE_FROM.
"""
import dataclasses
import random
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kernels"))
from attention_cases import make_batch, rel_error, shared_prefix_plan  # noqa: E402

from pagedllm.attention import torch_backend, triton_backend  # noqa: E402


def shapes(rng):
    yield "W5 target 1 x 1000 (32/8 heads)", (32, 8), [(1000, 1)]
    yield "W5 draft 1 x 1000 (16/8)", (16, 8), [(1000, 1)]
    yield "W5 verify 5 x 1000 (32/8)", (32, 8), [(1000 + i, 1) for i in range(5)]
    yield "batch 8 x 2000 (16/8)", (16, 8), [(2000, 1)] * 8
    yield "W1 decode 32 x U(100,2000) (16/8)", (16, 8), [(rng.randint(100, 2000), 1) for _ in range(32)]
    yield "W1 decode 256 x U(100,2000) (16/8)", (16, 8), [(rng.randint(100, 2000), 1) for _ in range(256)]
    yield "4 x 32k (16/8)", (16, 8), [(32768, 1)] * 4
    yield "W4 decode 32 x 30k (16/8)", (16, 8), [(30000, 1)] * 32


def graph_us(fn, calls=20):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    return do_bench(g.replay, warmup=10, rep=100, return_mode="median") * 1e3 / calls


def small_shared():
    print(f"device: {torch.cuda.get_device_name()}")
    triton_backend.SMALL_BATCH_SHARE_FROM = 0      # plan whatever is shared, however small the step
    for ctx in [1000, 2000, 3000, 4000, 6000, 8000, 12000]:
        for name, (hq, hkv), rows in [(f"verify 5 x {ctx} (32/8)", (32, 8), [(ctx + i, 1) for i in range(5)]),
                                      (f"n=4 x {ctx} (16/8)", (16, 8), [(ctx + 20, 1)] * 4),
                                      (f"n=8 x {ctx} (16/8)", (16, 8), [(ctx + 20, 1)] * 8)]:
            shared = [(list(range(len(rows))), (ctx - 1) // 16)]
            batch = make_batch(rows, hq, hkv, 128, 16, torch.bfloat16, "cuda", seed=0, shared=shared)
            triton_backend.write_kv(batch.kv_cache, batch.k, batch.v, batch.meta.slot_mapping)
            ref = torch_backend.paged_attention(batch.q, batch.kv_cache, batch.ref_meta, 128 ** -0.5)
            plan, items = shared_prefix_plan(batch, 16)
            line = []
            for mode, meta in [("shared", dataclasses.replace(batch.meta, shared=plan)), ("per row", batch.meta)]:
                fn = lambda m=meta: triton_backend.paged_attention(batch.q, batch.kv_cache, m, 128 ** -0.5)  # noqa
                line.append(f"{mode}: {graph_us(fn):7.1f} us (err {rel_error(fn(), ref):.1e})")
            print(f"{name:24s} {items:3d} items  " + " | ".join(line), flush=True)


def main():
    if sys.argv[1:] == ["--shared"]:
        return small_shared()
    partitions = [int(p) for p in sys.argv[1:]] or [512, 256, 128]
    print(f"device: {torch.cuda.get_device_name()}")
    for name, (hq, hkv), rows in shapes(random.Random(0)):
        batch = make_batch(rows, hq, hkv, 128, 16, torch.bfloat16, "cuda", seed=0)
        triton_backend.write_kv(batch.kv_cache, batch.k, batch.v, batch.meta.slot_mapping)
        ref = torch_backend.paged_attention(batch.q, batch.kv_cache, batch.ref_meta, 128 ** -0.5)
        line = []
        for p in partitions:
            triton_backend.PARTITION = triton_backend.SMALL_BATCH_PARTITION = p
            fn = lambda: triton_backend.paged_attention(batch.q, batch.kv_cache, batch.meta, 128 ** -0.5)  # noqa
            err = rel_error(fn(), ref)
            line.append(f"{p}: {graph_us(fn):7.1f} us (err {err:.1e})")
        print(f"{name:38s} " + " | ".join(line), flush=True)


if __name__ == "__main__":
    main()
