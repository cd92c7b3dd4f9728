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
"""
import random
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kernels"))
from attention_cases import make_batch, rel_error  # noqa: E402

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


def main():
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
