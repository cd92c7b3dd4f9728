"""Split-KV decode, pass 2: merge a decode row's segment results into its output.

Grid (num_reqs, num_q_heads). Rows whose query length is not 1 return (the prefill kernel owns them).
Segments are merged one at a time, in order, with the online-softmax rule

    M' = max(M, m_s)    L' = L * 2^(M - M') + l_s * 2^(m_s - M')    acc' = acc * 2^(M - M') + acc_s * 2^(m_s - M')

so the sum order is fixed by the row alone. A row with seq_len 0 (padding) has no segments and gets zeros.
With a sliding WINDOW the row's segments cut its window alone (decode_partition.row_segments).
"""
import triton
import triton.language as tl

from pagedllm.attention.kernels.decode_partition import row_segments


@triton.jit
def decode_reduce_kernel(
    out_ptr, part_out_ptr, part_max_ptr, part_sum_ptr, seq_lens_ptr, query_start_loc_ptr,
    stride_o_tok, stride_o_head,
    stride_po_req, stride_po_head, stride_po_part, stride_pm_req, stride_pm_head,
    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, PARTITION: tl.constexpr, MAX_SEGMENTS: tl.constexpr,
    TILE_N: tl.constexpr, WINDOW: tl.constexpr,
):
    req, head = tl.program_id(0), tl.program_id(1)
    q_start = tl.load(query_start_loc_ptr + req)
    if tl.load(query_start_loc_ptr + req + 1) - q_start != 1:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    _, _, num_segs = row_segments(seq_len, PARTITION, MAX_SEGMENTS, TILE_N, WINDOW)
    dims = tl.arange(0, HEAD_PAD)
    dim_ok = dims < HEAD_DIM
    part_out = part_out_ptr + req.to(tl.int64) * stride_po_req + head * stride_po_head
    stats = req.to(tl.int64) * stride_pm_req + head * stride_pm_head

    m = tl.full([], float("-inf"), tl.float32)
    total = tl.zeros([], tl.float32)
    acc = tl.zeros([HEAD_PAD], tl.float32)
    for seg in range(num_segs):
        m_s = tl.load(part_max_ptr + stats + seg)     # finite: a segment holds at least one key
        m_new = tl.maximum(m, m_s)
        alpha, beta = tl.math.exp2(m - m_new), tl.math.exp2(m_s - m_new)
        total = total * alpha + tl.load(part_sum_ptr + stats + seg) * beta
        acc = acc * alpha + tl.load(part_out + seg * stride_po_part + dims, mask=dim_ok, other=0.0) * beta
        m = m_new
    out = acc / tl.maximum(total, 1e-30)              # padding rows: 0 / tiny = 0
    tl.store(out_ptr + q_start.to(tl.int64) * stride_o_tok + head * stride_o_head + dims,
             out.to(out_ptr.dtype.element_ty), mask=dim_ok)
