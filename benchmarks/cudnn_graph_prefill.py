"""Long prefill rows through cuDNN's graph API (nvidia-cudnn-frontend) against the shipped path (issue 17).

Before 22998b2 the engine (pagedllm/attention/cudnn_prefill.py) called aten's cuDNN SDPA, whose causal mask is
top-left aligned and whose plans are per shape: it gathered a row's K/V, cut the row into a causal square and
context pieces of fixed shapes, and merged their parts. On W4-prefill's steps that cost, beside the attention
itself, merges (8.8 ms of 150 a step), gathers (3.3) and 7.7% padded pairs (gpu_profile.py at 2122c68, H200).
cuDNN's graph API has what that lacked: a bottom-right causal diagonal, lengths read on the device (one plan for
every length up to the declared maxima), and K/V read through a page table. Variants per row of
L new tokens after C cached ones:

    shipped    the engine's path for the row, cudnn_prefill.attend: since 22998b2 q, out and K/V declared as
               packed rows (ragged offsets) of fixed maxima, the lengths on the device, one plan for every row
               ("dense_thd" in the figures below); before, aten's SDPA in fixed shapes, merged
    dense      K/V gathered contiguous, one call, bottom-right causal, the row's exact shape (a plan per shape)

Measured before on the H200 (first call, 2026-12-05, cuDNN 9.19, frontend 1.22.0), TFLOP/s for 16k fresh /
13,616 after 16k / 8k after 24k / 2,768 fresh / 2k after 28k: the aten path (then shipped) 542 / 532 / 540 / 233
/ 457, dense 551 / 567 / 550 / 292 / 506. Dropped variants: "padded" (fixed maxima and device lengths, no ragged
offsets) 523 / 451 / 279 / 54 / 78: without ragged offsets the work follows the declared query maximum; "paged"
(K/V read through the block table, page 16) 444 / 391 / 239 / 43 / 62, and with ragged q ("paged_thd") 498 /
508 / 506 / 295 / 493: reading pages of 16 tokens costs ~10% against gathered rows. Second call (H100), with the
aten path as "shipped": dense_thd 523 / 533 / 524 / 258 / 453 against the aten path's 525 / 531 / 534 / 250 /
459 and dense 552 / 561 / 580 / 290 / 489: packed rows run at the old calls' speed, exact shapes 5-10% faster.
dense_thd, shipped since, is now "shipped" here. Third (H100, session 38): "override", one plan built at the
maxima with shape overrides enabled and run at each row's exact shapes (execute_plan_at_index), 553 / 457 / 269 /
an illegal memory access on 2,768 fresh: the plan keeps the maxima's kernel choice; dropped.

Each output is checked against float32 attention on 64 sampled query rows. Times: do_bench medians; TFLOP/s
counts the row's real (query, key) pairs, 4 x pairs x heads x head_dim.

    (GPU machine) pip install --no-deps --target /tmp/cfe nvidia_cudnn_frontend-1.22.1-*.whl
    PYTHONPATH=/tmp/cfe:$PWD python3 benchmarks/cudnn_graph_prefill.py
"""
import random
import sys
import time
import traceback

import torch
from triton.testing import do_bench

import cudnn
from pagedllm.attention import cudnn_prefill
from pagedllm.attention.metadata import AttentionMetadata

BLOCK = 16
KV_MAX = 32768
BF16, F32 = cudnn.data_type.BFLOAT16, cudnn.data_type.FLOAT
Q, K, V, O = 1, 2, 3, 4

_handle = None


def handle():
    global _handle
    if _handle is None:
        _handle = cudnn.create_handle()
    cudnn.set_stream(handle=_handle, stream=torch.cuda.current_stream().cuda_stream)
    return _handle


def build(hq, hkv, d, s_q, s_kv, scale):
    """A forward graph of packed rows: q and out (1, hq, s_q, d), K/V (1, hkv, s_kv, d), bottom-right causal.
    Returns (graph, workspace bytes, seconds to build)."""
    t = time.perf_counter()
    g = cudnn.pygraph(handle=handle(), io_data_type=BF16, intermediate_data_type=F32, compute_data_type=F32)
    q_dims, q_stride = [1, hq, s_q, d], rows_stride(s_q, hq, d)
    q = g.tensor(name="q", dim=q_dims, stride=q_stride, data_type=BF16, uid=Q)
    k = g.tensor(name="k", dim=[1, hkv, s_kv, d], stride=rows_stride(s_kv, hkv, d), data_type=BF16, uid=K)
    v = g.tensor(name="v", dim=[1, hkv, s_kv, d], stride=rows_stride(s_kv, hkv, d), data_type=BF16, uid=V)
    o = g.sdpa(name="sdpa", q=q, k=k, v=v, generate_stats=False, attn_scale=scale,
               diagonal_alignment=cudnn.diagonal_alignment.BOTTOM_RIGHT, diagonal_band_right_bound=0,
               compute_data_type=F32)[0]
    o.set_output(True).set_dim(q_dims).set_stride(q_stride).set_data_type(BF16).set_uid(O)
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans()
    return g, g.get_workspace_size(), time.perf_counter() - t


def rows_stride(n, heads, d):
    """(1, heads, n, d) as packed rows (n, heads, d): token-major, heads inside."""
    return [n * heads * d, d, heads * d, 1]


def reference(q, kv_cache, table, ctx, rows, scale):
    """float32 attention of the query rows `rows` (row i sees keys 0 .. ctx + i) -> (len(rows), hq, d)."""
    hq, (hkv, d) = q.shape[1], kv_cache.shape[3:]
    s = ctx + q.shape[0]
    pos = torch.arange(s, device=q.device)
    slots = table.long()[pos // BLOCK] * BLOCK + pos % BLOCK
    kv = kv_cache.view(2, -1, hkv, d)[:, slots].float().repeat_interleave(hq // hkv, dim=2)   # (2, s, hq, d)
    qs = q[rows].float()                                                                      # (r, hq, d)
    scores = torch.einsum("rhd,shd->hrs", qs, kv[0]) * scale
    scores.masked_fill_(pos[None, None, :] > (ctx + rows)[None, :, None], float("-inf"))
    return torch.einsum("hrs,shd->rhd", scores.softmax(-1), kv[1])


def case(hq, hkv, d, L, ctx, timed=True):
    torch.manual_seed(L + ctx + hq)
    scale = d ** -0.5
    s = ctx + L
    pages = -(-KV_MAX // BLOCK)
    kv_cache = torch.randn(2, pages + 64, BLOCK, hkv, d, device="cuda", dtype=torch.bfloat16)
    table = torch.zeros(pages, dtype=torch.int32, device="cuda")
    table[:-(-s // BLOCK)] = torch.randperm(pages + 64, device="cuda")[:-(-s // BLOCK)].int()
    q = torch.randn(L, hq, d, device="cuda", dtype=torch.bfloat16)
    rows = torch.sort(torch.randperm(L, device="cuda")[:64]).values
    ref = reference(q, kv_cache, table, ctx, rows, scale)
    pairs = L * ctx + L * (L + 1) // 2
    tflop = 4 * pairs * hq * d / 1e12
    print(f"\nheads {hq}/{hkv} d {d}: {L} new after {ctx} cached ({pairs / 1e6:.0f}M pairs)", flush=True)

    def report(name, fn, out, extra=""):
        try:
            fn()
            torch.cuda.synchronize()
            err = (out[rows].float() - ref).abs().max().item()
            ms = do_bench(fn, return_mode="median") if timed else float("nan")
            print(f"  {name:10s} {ms:8.3f} ms {tflop / ms * 1e3:7.1f} TFLOP/s  max err vs fp32 {err:.2e} {extra}",
                  flush=True)
        except Exception as e:
            print(f"  {name:10s} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            traceback.print_exc(limit=2)

    # shipped: the engine's path for this row (one plan, packed rows: dense_thd in the figures above)
    out = torch.empty_like(q)
    meta = AttentionMetadata(torch.zeros(L, dtype=torch.int64, device="cuda"),
                             torch.tensor([0, L], dtype=torch.int32, device="cuda"),
                             torch.tensor([s], dtype=torch.int32, device="cuda"), table[None], L, s, [0, L], [s])
    report("shipped", lambda: cudnn_prefill.attend(q, out, kv_cache, meta, scale, L), out)
    if not timed:
        return

    pos = torch.arange(s, device="cuda")
    slots = table.long()[pos // BLOCK] * BLOCK + pos % BLOCK
    flat = kv_cache.view(2, -1, hkv, d)
    k_g = torch.empty(2, s, hkv, d, device="cuda", dtype=torch.bfloat16)   # exactly the row's keys

    try:   # dense, the row's exact shape: a plan for each shape
        g, ws, secs = build(hq, hkv, d, L, s, scale)
        work = torch.empty(max(ws, 1), device="cuda", dtype=torch.uint8)
        out_d = torch.empty_like(q)

        def dense():
            torch.index_select(flat, 1, slots, out=k_g)
            g.execute({Q: q, K: k_g[0], V: k_g[1], O: out_d}, work, handle=handle())
        report("dense", dense, out_d, f"(plan {secs * 1e3:.0f} ms)")
        gather_ms = do_bench(lambda: torch.index_select(flat, 1, slots, out=k_g), return_mode="median")
        print(f"  {'':10s} of which the K/V gather {gather_ms:.3f} ms")
    except Exception as e:
        print(f"  dense      failed: {type(e).__name__}: {str(e)[:300]}", flush=True)


def main():
    backend = getattr(cudnn, "backend_version", lambda: "?")()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, cudnn backend {backend}, "
          f"frontend {getattr(cudnn, '__version__', '?')}", flush=True)
    random.seed(0)
    if "--sanitize" in sys.argv:   # under compute-sanitizer, no caching allocator: every tensor its own allocation
        case(16, 8, 128, 1500, 700, timed=False)     # the engine's path only
        case(16, 8, 128, 3000, 0, timed=False)
        return
    for hq, hkv, d, L, ctx in [(16, 8, 128, 16384, 0), (16, 8, 128, 13616, 16384), (16, 8, 128, 8192, 24576),
                               (16, 8, 128, 2768, 0), (16, 8, 128, 2048, 28672), (32, 8, 128, 16384, 0),
                               (32, 8, 128, 8192, 24576), (16, 8, 64, 16384, 0)]:
        case(hq, hkv, d, L, ctx)


if __name__ == "__main__":
    main()
