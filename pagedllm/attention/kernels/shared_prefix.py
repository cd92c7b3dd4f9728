"""Split-KV decode, pass 1 for segments that several decode rows share (cascade attention).

Rows whose block tables start with the same physical blocks (prefix-cache hits on one system prompt or
document) would each read those blocks' K/V again in decode_partition. Here one program reads a shared
segment once for up to ROWS of them: its tile rows are ROWS requests times the query heads of one kv head,

    row m = request rows[start + m // GROUP_PAD], query head kv_head * GROUP + (m % GROUP_PAD)

and it writes each row's result for that segment where decode_partition would have: decode_reduce merges
it with the row's other segments, in order, as before. decode_partition skips a row's first_seg segments.

Grid (num_items, num_kv_heads); item i = (segment, start, count, table row) from the host plan
(shared_prefix.plan_shared_prefix); items with count 0 are padding (a CUDA graph's grid) and return.
A shared segment is whole (PARTITION tokens, every row's seq_len at most PARTITION * MAX_SEGMENTS) and lies
before every row's last token, so no key is masked. SOFT_CAP caps the scores (attend_tile); a layer with a
sliding window does not run here (its rows read their windows alone: decode_partition).
"""
import triton
import triton.language as tl

from pagedllm.attention.kernels.attend_tile import attend_tile, dot_q


@triton.jit
def shared_prefix_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, query_start_loc_ptr, items_ptr, rows_ptr,
    part_out_ptr, part_max_ptr, part_sum_ptr,
    scale_log2, v_scale,
    stride_q_tok, stride_q_head, stride_bt,
    stride_c_block, stride_c_slot, stride_c_head,
    stride_po_req, stride_po_head, stride_po_part, stride_pm_req, stride_pm_head,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, PARTITION: tl.constexpr,
    PRECISION: tl.constexpr, SOFT_CAP: tl.constexpr,
):
    item, kv_head = tl.program_id(0), tl.program_id(1)
    seg = tl.load(items_ptr + item * 4)
    start = tl.load(items_ptr + item * 4 + 1)
    count = tl.load(items_ptr + item * 4 + 2)
    table_row = tl.load(items_ptr + item * 4 + 3)
    if count == 0:
        return

    m = tl.arange(0, ROWS * GROUP_PAD)
    local, head = m // GROUP_PAD, m % GROUP_PAD
    dims = tl.arange(0, HEAD_PAD)
    dim_ok = dims < HEAD_DIM
    row_ok = (local < count) & (head < GROUP)
    req = tl.load(rows_ptr + start + local, mask=local < count, other=0).to(tl.int64)
    q_tok = tl.load(query_start_loc_ptr + req, mask=local < count, other=0).to(tl.int64)
    q_head = kv_head * GROUP + head
    mask = row_ok[:, None] & dim_ok[None, :]
    q = tl.load(q_ptr + q_tok[:, None] * stride_q_tok + q_head[:, None] * stride_q_head + dims[None, :],
                mask=mask, other=0.0)
    q = dot_q(q, k_cache_ptr)
    table = block_tables_ptr + table_row.to(tl.int64) * stride_bt

    kv_start = seg * PARTITION
    kv_end = kv_start + PARTITION
    m_i = tl.full([ROWS * GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS * GROUP_PAD], tl.float32)
    acc = tl.zeros([ROWS * GROUP_PAD, HEAD_PAD], tl.float32)
    for tile_start in range(kv_start, kv_end, TILE_N):
        acc, m_i, l_i = attend_tile(q, acc, m_i, l_i, tile_start, kv_end, m_i, table, kv_head,
                                    k_cache_ptr, v_cache_ptr, dims, dim_ok, scale_log2,
                                    stride_c_block, stride_c_slot, stride_c_head,
                                    BLOCK_SIZE, TILE_N, False, PRECISION, 0, SOFT_CAP)
    if k_cache_ptr.dtype.element_ty == tl.float8e4nv:
        acc = acc * v_scale                               # fp8 V: its scale
    out_off = req * stride_po_req + q_head * stride_po_head + seg * stride_po_part
    tl.store(part_out_ptr + out_off[:, None] + dims[None, :], acc, mask=mask)
    stat_off = req * stride_pm_req + q_head * stride_pm_head + seg
    tl.store(part_max_ptr + stat_off, m_i, mask=row_ok)
    tl.store(part_sum_ptr + stat_off, l_i, mask=row_ok)
