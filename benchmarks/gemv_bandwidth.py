"""How close a few-row linear layer gets to the weights' read bandwidth: the W5 target's (Qwen3-8B shape) four
projections and LM head at M = 5 rows (a k=4 verify) and 1, bf16, each layer its own weights (L2 cannot hold
them), a CUDA graph of 28 calls replayed. cuBLAS (torch.mm) against two Triton GEMVs:

    full-K:  small_m_linear's kernel (no norm), each program BLOCK_N columns over all of K, a tile sweep
    split-K: programs (BLOCK_N columns, one of SPLIT slices of K) write fp32 partials; a second launch sums the
             SPLIT partials of each output in a fixed order (deterministic), casts and stores

Question it answers (issue 16): the 8B verify reads ~16.4 GB at ~70% of the HBM bandwidth; is there a GEMV that
reads faster than cuBLAS at these shapes, and by how much a pass.

    python benchmarks/gemv_bandwidth.py [--quick]
"""
import itertools
import json
import sys

import torch
import triton
import triton.language as tl

from small_m_layers import LAYERS, us   # a CUDA graph of 28 calls, each layer its own weights

from pagedllm.layers.kernels.small_m_linear import small_m_linear

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288)}


@triton.jit
def splitk_kernel(x_ptr, w_ptr, part_ptr, M, N, K, K_PER_SPLIT,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n, split = tl.program_id(0), tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = split * K_PER_SPLIT
    for k0 in range(k_lo, k_lo + K_PER_SPLIT, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        w = tl.load(w_ptr + rn[:, None].to(tl.int64) * K + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < K),
                    other=0.0)
        acc += tl.dot(x, tl.trans(w))
    tl.store(part_ptr + (split * BLOCK_M + rm[:, None]) * N + rn[None, :], acc, mask=rn[None, :] < N)


@triton.jit
def splitk_reduce_kernel(part_ptr, out_ptr, M, N, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK: tl.constexpr):
    rn = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    for m in range(0, M):
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(SPLIT):
            acc += tl.load(part_ptr + (s * BLOCK_M + m) * N + rn, mask=rn < N, other=0.0)
        tl.store(out_ptr + m * N + rn, acc.to(out_ptr.dtype.element_ty), mask=rn < N)


def splitk(x, w, part, out, block_n, block_k, split, warps, stages):
    m, k = x.shape
    n = w.shape[0]
    k_per = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    splitk_kernel[(triton.cdiv(n, block_n), split)](x, w, part, m, n, k, k_per, BLOCK_M=16, BLOCK_N=block_n,
                                                    BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    splitk_reduce_kernel[(triton.cdiv(n, 1024),)](part, out, m, n, SPLIT=split, BLOCK_M=16, BLOCK=1024,
                                                   num_warps=4)
    return out


def main():
    quick = "--quick" in sys.argv
    torch.manual_seed(0)
    dt = torch.bfloat16
    full_tiles = [(bn, bk, wp, st) for bn, bk, wp, st in itertools.product(
        (16, 32, 64), (128, 256, 512), (4, 8), (3, 4) if not quick else (3,)) if bn * bk <= 16384]
    split_tiles = [(bn, bk, s, wp, st) for bn, bk, s, wp, st in itertools.product(
        (16, 32, 64), (128, 256), (2, 4, 8), (4,), (3, 4) if not quick else (3,)) if bn * bk <= 16384]
    total = {}
    for name, (n, k) in SHAPES.items():
        ws = [torch.randn(n, k, device="cuda", dtype=dt) / k ** 0.5 for _ in range(LAYERS)]
        gb = n * k * 2 / 1e3    # bytes / 1e3: GB/s when divided by us
        for m in (5, 1):
            x = torch.randn(m, k, device="cuda", dtype=dt)
            ref = torch.mm(x, ws[0].t()).float()
            part = torch.empty(8 * 16, n, device="cuda", dtype=torch.float32)
            out = torch.empty(m, n, device="cuda", dtype=dt)
            res = {"cublas": (us(lambda i: torch.mm(x, ws[i].t())), None)}
            for kind, tiles in (("full", full_tiles), ("split", split_tiles)):
                best = None
                for t in tiles:
                    if kind == "full":
                        fn = lambda i, t=t: small_m_linear(x, ws[i], tile=t)   # noqa: E731
                    else:
                        fn = lambda i, t=t: splitk(x, ws[i], part, out, *t)   # noqa: E731
                    try:
                        err = (fn(0).float() - ref).abs().max().item() / ref.abs().max().item()
                        if err > 2e-2:
                            print(f"  {name} {kind} {t}: rel err {err:.1e}", flush=True)
                            continue
                        t_us = us(fn)
                    except Exception as e:   # a tile past the shared memory
                        print(f"  {name} {kind} {t}: {type(e).__name__}", flush=True)
                        continue
                    if best is None or t_us < best[0]:
                        best = (t_us, t)
                res[kind] = best
            print(json.dumps({"op": name, "M": m, **{kk: [round(v[0], 2), round(gb / v[0]), v[1]]
                                                      for kk, v in res.items()}}), flush=True)
            for kk, v in res.items():
                total[(m, kk)] = total.get((m, kk), 0.0) + v[0]
    for (m, kk), v in sorted(total.items()):
        print(json.dumps({"M": m, "kind": kk, "layer_us": round(v, 2), "pass_ms_36_layers": round(v * 36 / 1e3, 3)}))


if __name__ == "__main__":
    main()
