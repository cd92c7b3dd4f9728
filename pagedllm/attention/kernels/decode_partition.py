"""Split-KV decode, pass 1: attention of one query token over fixed segments of its context.

Grid (num_reqs, num_kv_heads, num_splits). Program (r, h, z) serves request r if it has exactly one query
token, and only then: the query heads of kv head h against segments z, z + num_splits, ... of r's context.
For each segment it writes the unnormalised output and the softmax statistics (max, sum, in log2 units);
decode_reduce merges the segments in order.

With HAS_SHARED, segments below first_seg[r] are skipped: shared_prefix wrote them, once for many rows.

A row's segments depend on its own seq_len and on PARTITION alone (segment_len below: PARTITION tokens up to
MAX_SEGMENTS segments, longer beyond; triton_backend.decode_partition picks PARTITION per step: 512, or 128 for
a decode-only step of at most 8 rows), never on num_splits or on the max_seq_len bound that sized the grid; so
a row's output is bit-identical in any step of the same PARTITION, eager or replayed from a CUDA graph.

    rows of the tile: the GROUP query heads of kv head h, padded to BLOCK_M (>= 16, for tl.dot)
    keys of a tile:   t = tile_start .. tile_start + TILE_N - 1, slot block_table[t // BLOCK_SIZE], t % BLOCK_SIZE
"""
import triton
import triton.language as tl

from pagedllm.attention.kernels.attend_tile import attend_tile, dot_q


@triton.jit
def segment_len(seq_len, PARTITION: tl.constexpr, MAX_SEGMENTS: tl.constexpr, TILE_N: tl.constexpr):
    """Tokens per segment of a row: PARTITION, or more (a multiple of TILE_N) so that at most MAX_SEGMENTS."""
    spread = tl.cdiv(tl.cdiv(seq_len, MAX_SEGMENTS), TILE_N) * TILE_N
    return tl.maximum(spread, PARTITION)


# num_splits unspecialised: one binary for every split count, so the count cannot change a result.
@triton.jit(do_not_specialize=["num_splits"])
def decode_partition_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, first_seg_ptr,
    part_out_ptr, part_max_ptr, part_sum_ptr,
    scale_log2, v_scale, num_splits,
    stride_q_tok, stride_q_head, stride_bt,
    stride_c_block, stride_c_slot, stride_c_head,
    stride_po_req, stride_po_head, stride_po_part, stride_pm_req, stride_pm_head,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, PARTITION: tl.constexpr, MAX_SEGMENTS: tl.constexpr,
    PRECISION: tl.constexpr, HAS_SHARED: tl.constexpr,
):
    req, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + req)
    if tl.load(query_start_loc_ptr + req + 1) - q_start != 1:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    seg_len = segment_len(seq_len, PARTITION, MAX_SEGMENTS, TILE_N)
    num_segs = tl.cdiv(seq_len, seg_len)
    first = 0
    if HAS_SHARED:
        first = tl.load(first_seg_ptr + req)
    if first + split >= num_segs:
        return

    rows = tl.arange(0, BLOCK_M)                      # query head within the group
    dims = tl.arange(0, HEAD_PAD)
    row_ok, dim_ok = rows < GROUP, dims < HEAD_DIM
    q_head = kv_head * GROUP + rows
    q = tl.load(q_ptr + q_start.to(tl.int64) * stride_q_tok + q_head[:, None] * stride_q_head + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    q = dot_q(q, k_cache_ptr)
    table = block_tables_ptr + req.to(tl.int64) * stride_bt
    out_base = req.to(tl.int64) * stride_po_req + q_head * stride_po_head
    stat_base = req.to(tl.int64) * stride_pm_req + q_head * stride_pm_head

    for seg in range(first + split, num_segs, num_splits):
        kv_start = seg * seg_len
        kv_end = tl.minimum(kv_start + seg_len, seq_len)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
        seg_end = kv_end + tl.zeros([BLOCK_M], tl.int32)     # every row sees the whole segment
        for tile_start in range(kv_start, kv_end, TILE_N):    # each tile holds a key: the max stays finite
            acc, m_i, l_i = attend_tile(q, acc, m_i, l_i, tile_start, kv_end, seg_end, table, kv_head,
                                        k_cache_ptr, v_cache_ptr, dims, dim_ok, scale_log2,
                                        stride_c_block, stride_c_slot, stride_c_head,
                                        BLOCK_SIZE, TILE_N, True, PRECISION)
        if k_cache_ptr.dtype.element_ty == tl.float8e4nv:
            acc = acc * v_scale                           # fp8 V: its scale, once per segment
        out_off = out_base + seg * stride_po_part
        tl.store(part_out_ptr + out_off[:, None] + dims[None, :], acc, mask=row_ok[:, None] & dim_ok[None, :])
        tl.store(part_max_ptr + stat_base + seg, m_i, mask=row_ok)
        tl.store(part_sum_ptr + stat_base + seg, l_i, mask=row_ok)
