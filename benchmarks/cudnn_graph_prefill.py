"""Long prefill rows through cuDNN's graph API (nvidia-cudnn-frontend) against the shipped path (issue 17).

The shipped path (pagedllm/attention/cudnn_prefill.py) calls aten's cuDNN SDPA, whose causal mask is top-left
aligned and whose plans are per shape: it gathers a row's K/V, cuts the row into a causal square and context
pieces of fixed shapes, and merges their parts. On W4-prefill's steps that costs, beside the attention itself,
merges (8.8 ms of 150 a step), gathers (3.3) and 7.7% padded pairs (gpu_profile.py at 2122c68, H200).
cuDNN's graph API has what the shipped path lacks: a bottom-right causal diagonal, lengths read on the device
(one plan for every length up to the declared maxima), and K/V read through a page table. Variants per row of
L new tokens after C cached ones:

    shipped    the engine's path for the row, cudnn_prefill.attend (was: aten's SDPA, fixed shapes, merged)
    dense      K/V gathered contiguous, one call, bottom-right causal, the row's exact shape (a plan per shape)
    dense_thd  dense with q, out and K/V declared as packed rows (ragged offsets) of fixed maxima, the lengths
               on the device: one plan for every row (what cudnn_prefill.py now does)
    override   one plan built at the maxima with shape overrides enabled, run at the row's exact shapes
               (execute_plan_at_index with override_shapes): whether it keeps dense's 5-10% over dense_thd.
               NOT RUN YET (written after session 37's last GPU call)

Measured before on the H200 (first call, 2026-12-05, cuDNN 9.19, frontend 1.22.0), TFLOP/s for 16k fresh / 13,616
after 16k / 8k after 24k / 2,768 fresh / 2k after 28k: shipped 542 / 532 / 540 / 233 / 457, dense 551 / 567 /
550 / 292 / 506. Dropped variants: "padded" (fixed maxima and device lengths, no ragged offsets) 523 / 451 / 279
/ 54 / 78: without ragged offsets the work follows the declared query maximum; "paged" (K/V read through the
block table, page 16) 444 / 391 / 239 / 43 / 62, and with ragged q ("paged_thd") 498 / 508 / 506 / 295 / 493:
reading pages of 16 tokens costs ~10% against gathered rows. Second call (H100, 22998b2's path as "shipped" was
then aten's): dense_thd 523 / 533 / 524 / 258 / 453 against shipped 525 / 531 / 534 / 250 / 459 and dense 552 /
561 / 580 / 290 / 489: packed rows run at the old calls' speed, exact shapes 5-10% faster.

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
Q_MAX, KV_MAX = 16384, 32768
BF16, F32, I32 = cudnn.data_type.BFLOAT16, cudnn.data_type.FLOAT, cudnn.data_type.INT32
Q, K, V, O, SEQ_Q, SEQ_KV, TABLE_K, TABLE_V, RAG_Q, RAG_KV = 1, 2, 3, 4, 5, 6, 7, 8, 9, 10

_handle = None


def handle():
    global _handle
    if _handle is None:
        _handle = cudnn.create_handle()
    cudnn.set_stream(handle=_handle, stream=torch.cuda.current_stream().cuda_stream)
    return _handle


def build(hq, hkv, d, s_q, s_kv, q_stride, k_dims, k_stride, scale, lengths: bool, pages: int = 0,
          ragged: bool = False, ragged_kv: bool = False, override: bool = False):
    """A forward graph: q (1, hq, s_q, d) at q_stride, K/V k_dims at k_stride (a page pool when pages),
    bottom-right causal, out at q's layout. Returns (graph, workspace bytes, seconds to build)."""
    t = time.perf_counter()
    g = cudnn.pygraph(handle=handle(), io_data_type=BF16, intermediate_data_type=F32, compute_data_type=F32,
                      **({"is_override_shape_enabled": True} if override else {}))
    q = g.tensor(name="q", dim=[1, hq, s_q, d], stride=list(q_stride), data_type=BF16, uid=Q)
    k = g.tensor(name="k", dim=list(k_dims), stride=list(k_stride), data_type=BF16, uid=K)
    v = g.tensor(name="v", dim=list(k_dims), stride=list(k_stride), data_type=BF16, uid=V)
    extra = {}
    if lengths:
        sq = g.tensor(name="seq_q", dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=I32, uid=SEQ_Q)
        skv = g.tensor(name="seq_kv", dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=I32, uid=SEQ_KV)
        extra.update(use_padding_mask=True, seq_len_q=sq, seq_len_kv=skv)
    if pages:
        tk = g.tensor(name="table_k", dim=[1, 1, pages, 1], stride=[pages, pages, 1, 1], data_type=I32, uid=TABLE_K)
        tv = g.tensor(name="table_v", dim=[1, 1, pages, 1], stride=[pages, pages, 1, 1], data_type=I32, uid=TABLE_V)
        extra.update(paged_attention_k_table=tk, paged_attention_v_table=tv, paged_attention_max_seq_len_kv=s_kv)
    rag = None
    if ragged:
        rag = g.tensor(name="rag_q", dim=[2, 1, 1, 1], stride=[1, 1, 1, 1], data_type=I32, uid=RAG_Q)
        q.set_ragged_offset(rag)
    if ragged_kv:
        rag_kv = g.tensor(name="rag_kv", dim=[2, 1, 1, 1], stride=[1, 1, 1, 1], data_type=I32, uid=RAG_KV)
        k.set_ragged_offset(rag_kv)
        v.set_ragged_offset(rag_kv)
    res = g.sdpa(name="sdpa", q=q, k=k, v=v, generate_stats=False, attn_scale=scale,
                 diagonal_alignment=cudnn.diagonal_alignment.BOTTOM_RIGHT, diagonal_band_right_bound=0,
                 compute_data_type=F32, **extra)
    o = res[0] if isinstance(res, (list, tuple)) else res
    o.set_output(True).set_dim([1, hq, s_q, d]).set_stride(list(q_stride)).set_data_type(BF16).set_uid(O)
    if ragged:
        o.set_ragged_offset(rag)
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans()
    return g, g.get_workspace_size(), time.perf_counter() - t


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


def case(hq, hkv, d, L, ctx, plans, q_max=Q_MAX, kv_max=KV_MAX, timed=True):
    torch.manual_seed(L + ctx + hq)
    scale = d ** -0.5
    s = ctx + L
    pages = -(-kv_max // BLOCK)
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

    if timed:   # shipped: the engine's path for this row
        out = torch.empty_like(q)
        meta = AttentionMetadata(torch.zeros(L, dtype=torch.int64, device="cuda"),
                                 torch.tensor([0, L], dtype=torch.int32, device="cuda"),
                                 torch.tensor([s], dtype=torch.int32, device="cuda"), table[None], L, s, [0, L], [s])
        report("shipped", lambda: cudnn_prefill.attend(q, out, kv_cache, meta, scale, L), out)

    pos = torch.arange(s, device="cuda")
    slots = table.long()[pos // BLOCK] * BLOCK + pos % BLOCK
    flat = kv_cache.view(2, -1, hkv, d)
    k_g = torch.empty(2, s, hkv, d, device="cuda", dtype=torch.bfloat16)   # exactly the row's keys

    if timed:   # dense, the row's exact shape: a plan for each shape
        try:
            g, ws, secs = build(hq, hkv, d, L, s, (L * hq * d, d, hq * d, 1), (1, hkv, s, d),
                                (s * hkv * d, d, hkv * d, 1), scale, lengths=False)
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

    # dense_override: one plan built at the maxima with shape overrides allowed, run at the row's exact shapes
    try:
        key = ("dense_override", hq, hkv, d, q_max, kv_max)
        if key not in plans:
            plans[key] = build(hq, hkv, d, q_max, kv_max, (q_max * hq * d, d, hq * d, 1), (1, hkv, kv_max, d),
                               (kv_max * hkv * d, d, hkv * d, 1), scale, lengths=False, override=True)
        g, ws, secs = plans[key]
        work = torch.empty(max(ws, 1), device="cuda", dtype=torch.uint8)
        out_o = torch.empty_like(q)
        q_shape, kv_shape = [1, hq, L, d], [1, hkv, s, d]
        q_st, kv_st = [L * hq * d, d, hq * d, 1], [s * hkv * d, d, hkv * d, 1]

        def dense_override():
            torch.index_select(flat, 1, slots, out=k_g)
            g.execute_plan_at_index({Q: q, K: k_g[0], V: k_g[1], O: out_o}, work, 0, handle=handle(),
                                    override_uids=[Q, K, V, O], override_shapes=[q_shape, kv_shape, kv_shape, q_shape],
                                    override_strides=[q_st, kv_st, kv_st, q_st])
        report("override", dense_override, out_o, f"(plan {secs * 1e3:.0f} ms, once)")
    except Exception as e:
        print(f"  override   failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        traceback.print_exc(limit=3)

    # dense_thd: q, out and the gathered K/V as packed rows (ragged offsets, in elements) of fixed maxima,
    # the lengths on the device: one plan for every row; nothing is allocated past the row's own tokens
    try:
        key = ("dense_thd", hq, hkv, d, q_max, kv_max)
        if key not in plans:
            plans[key] = build(hq, hkv, d, q_max, kv_max, (q_max * hq * d, d, hq * d, 1), (1, hkv, kv_max, d),
                               (kv_max * hkv * d, d, hkv * d, 1), scale, lengths=True, ragged=True, ragged_kv=True)
        g, ws, secs = plans[key]
        work = torch.empty(max(ws, 1), device="cuda", dtype=torch.uint8)
        lens = torch.tensor([L, s, 0, L * hq * d, 0, s * hkv * d], dtype=torch.int32, device="cuda")
        out_t = torch.empty_like(q)

        def dense_thd():
            torch.index_select(flat, 1, slots, out=k_g)
            g.execute({Q: q, K: k_g[0], V: k_g[1], O: out_t, SEQ_Q: lens[0:1], SEQ_KV: lens[1:2],
                       RAG_Q: lens[2:4], RAG_KV: lens[4:6]}, work, handle=handle())
        report("dense_thd", dense_thd, out_t, f"(plan {secs * 1e3:.0f} ms, once)")
    except Exception as e:
        print(f"  dense_thd  failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        traceback.print_exc(limit=3)


def main():
    backend = getattr(cudnn, "backend_version", lambda: "?")()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, cudnn backend {backend}, "
          f"frontend {getattr(cudnn, '__version__', '?')}", flush=True)
    random.seed(0)
    plans = {}
    if "--sanitize" in sys.argv:   # under compute-sanitizer, no caching allocator: every tensor its own allocation
        case(16, 8, 128, 1500, 700, plans, q_max=4096, kv_max=8192, timed=False)
        case(16, 8, 128, 3000, 0, plans, q_max=4096, kv_max=8192, timed=False)
        return
    for hq, hkv, d, L, ctx in [(16, 8, 128, 16384, 0), (16, 8, 128, 13616, 16384), (16, 8, 128, 8192, 24576),
                               (16, 8, 128, 2768, 0), (16, 8, 128, 2048, 28672), (32, 8, 128, 16384, 0),
                               (32, 8, 128, 8192, 24576), (16, 8, 64, 16384, 0)]:
        case(hq, hkv, d, L, ctx, plans)


if __name__ == "__main__":
    main()
