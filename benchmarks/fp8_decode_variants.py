"""Decode attention tiles on an fp8 KV cache and on a bf16 one, same shapes (issue 18): triton_backend's split-KV
kernel with _decode_config replaced (TILE_N, warps, stages: the reduce kernel sees the same tile).

Measured before on the H200 (us; W1's 256 rows / 4 x 32k / W4's 32 x 30k / 32 short rows):
- 2122c68, ways to read an fp8 tile at (64, 4, 2): widened to bf16 325.5 / 164.9 / 966.1 / 63.0; to fp16 291.0 /
  148.9 / 855.6 / 57.8 (shipped since 31419c4); to fp16 by bit shifts 366.4 / 178.6 / 1,097 / 70.8; no tl.dot
  (fp32 FMA) 981.9 / 482.9 / 3,206 / 165.8; bf16 cache 291.3 / 143.2 / 910.2 / 63.6.
- 668da6d..f7e1b57, a `swapped` variant (s^T = K q^T, acc^T = V^T p^T: keys and head dims on wgmma's M side) at
  (64, 4): fp8 442.9 / 204.2 / 1,341.6 / 100.2, slower than the shipped kernel on all but one call's 32 short
  rows; deleted.
- 975b4dd, fp8 shipped at (64, 4, 2) 290.2 / 148.7 / 857.7 / 92.0 and at (128, 4, 2) 235.1 / 116.4 / 658.1 /
  84.0 (shipped since): twice the keys a tile, as many bytes in flight as a bf16 tile of 64.

- 335e086 + V through an fp16 shared tile (`v.to(fp16) * key_ok[:, None]`, which Triton does not move past the
  dot's layout change: ldmatrix.trans instead of byte-wide shared loads) at (128,4,3) / (64,4,2), against
  the shipped kernel: 294.3 / 259.1 vs 230.6; 133.8 / 126.0 vs 114.2; 837.6 / 785.0 vs 644.1; 74.5 / 67.7 vs
  138.4. Slower but on the 32 short rows: not shipped.

Each output is checked against the torch reference on the same cache (an fp8 one dequantized). Times: do_bench
medians.

    PYTHONPATH=$PWD python3 benchmarks/fp8_decode_variants.py [--tiles 128,4,3 64,4,2] [--caches fp8]
"""
import argparse
import dataclasses
import random
import sys
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kernels"))
from attention_cases import make_batch, rel_error  # noqa: E402

from pagedllm.attention import torch_backend, triton_backend  # noqa: E402


def shapes(rng):
    yield "W1 decode 256 x U(100,2000)", [(rng.randint(100, 2000), 1) for _ in range(256)]
    yield "long decode 4 x 32k", [(32768, 1)] * 4
    yield "W4 decode 32 x 30k", [(30000, 1)] * 32
    yield "W1 decode 32 x U(100,2000)", [(rng.randint(100, 2000), 1) for _ in range(32)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", nargs="*", default=None, help="TILE_N,warps,stages each (default: a sweep)")
    ap.add_argument("--caches", default="fp8,bf16", help="which caches the tiles run on")
    ap.add_argument("--profile", default=None, metavar="SHAPE",
                    help="only run the shipped kernel 3 times on the shape whose name starts with SHAPE, each "
                         "--caches cache (for ncu: --kernel-name regex:decode_partition --launch-skip 2)")
    args = ap.parse_args()
    if args.profile:
        return profile(args.profile, args.caches.split(","))
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    rng = random.Random(0)
    hq, hkv, d = 16, 8, 128                    # Qwen3-0.6B heads
    scale = d ** -0.5
    tiles = [(64, 4, 2), (128, 4, 2), (128, 4, 3), (128, 2, 2), (256, 4, 2), (256, 8, 2), (64, 2, 2), (32, 4, 3)]
    if args.tiles is not None:
        tiles = [tuple(int(x) for x in t.split(",")) for t in args.tiles]
    for name, rows in shapes(rng):
        batch = make_batch(rows, hq, hkv, d, 16, torch.bfloat16, "cuda", seed=0)
        triton_backend.write_kv(batch.kv_cache, batch.k, batch.v, batch.meta.slot_mapping)
        fp8 = dataclasses.replace(batch, kv_cache=batch.kv_cache.float().clamp(-448, 448).to(torch.float8_e4m3fn))
        ref = torch_backend.paged_attention(batch.q, fp8.kv_cache.to(torch.bfloat16), batch.ref_meta, scale)
        ref_bf16 = torch_backend.paged_attention(batch.q, batch.kv_cache, batch.ref_meta, scale)
        ctx = sum(s for s, _ in rows)
        print(f"\n{name}: {ctx} context tokens")

        def timed(label, b):
            fn = lambda: triton_backend.paged_attention(b.q, b.kv_cache, b.meta, scale)  # noqa: E731
            err = rel_error(fn(), ref if b.kv_cache.dtype != torch.bfloat16 else ref_bf16)
            ms = do_bench(fn, return_mode="median")
            gbs = ctx * hkv * d * 2 * b.kv_cache.dtype.itemsize / ms / 1e6
            print(f"  {label:40s} {ms * 1e3:8.1f} us {gbs:8.1f} GB/s  rel err vs the torch reference {err:.2e}",
                  flush=True)

        def timed_at(label, b, tile):
            """timed() with triton_backend._decode_config returning tile for the run."""
            shipped = triton_backend._decode_config
            triton_backend._decode_config = lambda *args: tile
            try:
                timed(label, b)
            except Exception as e:   # a tile that does not compile here (shared memory): say so and go on
                print(f"  {label:40s} failed: {type(e).__name__}: {str(e)[:200]}")
            finally:
                triton_backend._decode_config = shipped
        timed("bf16 cache (shipped tile)", batch)
        timed("fp8 cache (shipped tile)", fp8)
        for cache, b in (("fp8", fp8), ("bf16", batch)):
            for tile in tiles if cache in args.caches.split(",") else ():
                timed_at(f"{cache} at {tile}", b, tile)


def profile(prefix: str, caches: list[str]):
    [rows] = [rows for name, rows in shapes(random.Random(0)) if name.startswith(prefix)]
    batch = make_batch(rows, 16, 8, 128, 16, torch.bfloat16, "cuda", seed=0)
    triton_backend.write_kv(batch.kv_cache, batch.k, batch.v, batch.meta.slot_mapping)
    for cache in caches:
        b = batch if cache == "bf16" else dataclasses.replace(
            batch, kv_cache=batch.kv_cache.float().clamp(-448, 448).to(torch.float8_e4m3fn))
        for _ in range(3):
            triton_backend.paged_attention(b.q, b.kv_cache, b.meta, 128 ** -0.5)
        torch.cuda.synchronize()
        print(f"profiled {prefix} {cache}", flush=True)


if __name__ == "__main__":
    main()
