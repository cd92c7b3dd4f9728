"""Split-KV decode, pass 1: attention of one query token over fixed segments of its context.

Grid (num_reqs, num_kv_heads, num_splits). Program (r, h, z) serves request r if it has exactly one query
token, and only then: the query heads of kv head h against segments z, z + num_splits, ... of r's context.
For each segment it writes the unnormalised output and the softmax statistics (max, sum, in log2 units);
decode_reduce merges the segments in order.

With HAS_SHARED, segments below first_seg[r] are skipped: shared_prefix wrote them, once for many rows.

With a sliding WINDOW (a compile-time constant; 0: off) a row reads only its last WINDOW keys: its segments cut
those, from the window's first key (row_segments), so no program touches a block wholly before the window and
no key in a segment needs a window mask. Shared segments cut the whole context: a windowed layer runs without
them (HAS_SHARED off). SOFT_CAP caps the scores (attend_tile).

With ROPE (decode-only steps without shared segments: triton_backend.decode_qkv), q_ptr is the qkv projection's
output, (T, Hq + 2*Hkv heads, D): each program norms and rotates its query heads itself (qk_norm_rope's
arithmetic; UNIT_OFFSET: Gemma's norm), and the program of a row's last segment first stores the row's new K
(normed, rotated) and V in its slot, then attends over it: the qk_norm_rope launch before is saved.

A row's segments depend on its own seq_len and on PARTITION alone (row_segments below: PARTITION tokens up to
MAX_SEGMENTS segments, longer beyond; triton_backend.decode_partition picks PARTITION per step: 512, or 128 for
a decode-only step of at most 8 rows), never on num_splits or on the max_seq_len bound that sized the grid; so
a row's output is bit-identical in any step of the same PARTITION, eager or replayed from a CUDA graph.

    rows of the tile: the GROUP query heads of kv head h, padded to BLOCK_M (>= 16, for tl.dot)
    keys of a tile:   t = tile_start .. tile_start + TILE_N - 1, slot block_table[t // BLOCK_SIZE], t % BLOCK_SIZE
"""
import triton
import triton.language as tl

from pagedllm.attention.kernels.attend_tile import attend_tile, dot_q
from pagedllm.layers.kernels.qk_norm_rope import cache_value, norm_rope_heads


@triton.jit
def segment_len(seq_len, PARTITION: tl.constexpr, MAX_SEGMENTS: tl.constexpr, TILE_N: tl.constexpr):
    """Tokens per segment of a row: PARTITION, or more (a multiple of TILE_N) so that at most MAX_SEGMENTS."""
    spread = tl.cdiv(tl.cdiv(seq_len, MAX_SEGMENTS), TILE_N) * TILE_N
    return tl.maximum(spread, PARTITION)


@triton.jit
def row_segments(seq_len, PARTITION: tl.constexpr, MAX_SEGMENTS: tl.constexpr, TILE_N: tl.constexpr,
                 WINDOW: tl.constexpr):
    """(first key, segment length, number of segments) of a decode row: the keys it sees, first key on, in
    segments of segment_len. Without WINDOW all seq_len keys; with it the last min(seq_len, WINDOW).

        keys  0 .......... first ......... seq_len - 1
                           | seg 0 | seg 1 | seg 2 |      (the last one may be short)
    """
    first = 0
    if WINDOW:
        first = tl.maximum(seq_len - WINDOW, 0)
    seg_len = segment_len(seq_len - first, PARTITION, MAX_SEGMENTS, TILE_N)
    return first, seg_len, tl.cdiv(seq_len - first, seg_len)


# num_splits unspecialised: one binary for every split count, so the count cannot change a result.
@triton.jit(do_not_specialize=["num_splits"])
def decode_partition_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, first_seg_ptr,
    part_out_ptr, part_max_ptr, part_sum_ptr,
    scale_log2, v_scale, num_splits,
    stride_q_tok, stride_q_head, stride_bt,
    stride_c_block, stride_c_slot, stride_c_head,
    stride_po_req, stride_po_head, stride_po_part, stride_pm_req, stride_pm_head,
    pos_ptr, cos_sin_ptr, stride_cos_sin, q_w_ptr, k_w_ptr, q_eps, k_eps, slot_ptr, k_inv, v_inv,   # ROPE only
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, PARTITION: tl.constexpr, MAX_SEGMENTS: tl.constexpr,
    PRECISION: tl.constexpr, HAS_SHARED: tl.constexpr, WINDOW: tl.constexpr, SOFT_CAP: tl.constexpr,
    ROPE: tl.constexpr, HAS_NORM: tl.constexpr, UNIT_OFFSET: tl.constexpr, NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
):
    req, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + req)
    if tl.load(query_start_loc_ptr + req + 1) - q_start != 1:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    kv_first, seg_len, num_segs = row_segments(seq_len, PARTITION, MAX_SEGMENTS, TILE_N, WINDOW)
    first = 0
    if HAS_SHARED:
        tl.static_assert(WINDOW == 0, "shared segments cut the whole context: a windowed layer reads its own")
        first = tl.load(first_seg_ptr + req)
    if first + split >= num_segs:
        return

    rows = tl.arange(0, BLOCK_M)                      # query head within the group
    dims = tl.arange(0, HEAD_PAD)
    row_ok, dim_ok = rows < GROUP, dims < HEAD_DIM
    q_head = kv_head * GROUP + rows
    if ROPE:   # HEAD_PAD == HEAD_DIM, a power of two; no shared segments (first == 0)
        row_ptr = q_ptr + q_start.to(tl.int64) * stride_q_tok
        cos_sin = cos_sin_ptr + tl.load(pos_ptr + q_start).to(tl.int64) * stride_cos_sin
        q = norm_rope_heads(row_ptr, q_head, row_ok, q_w_ptr, q_eps, cos_sin, HEAD_DIM, HAS_NORM, UNIT_OFFSET)
        q = q.to(q_ptr.dtype.element_ty)
        if split == (num_segs - 1) % num_splits:     # this program reads the row's last segment: store first
            _store_token_kv(row_ptr, cos_sin, kv_head, k_w_ptr, k_eps, tl.load(slot_ptr + q_start).to(tl.int64),
                            k_inv, v_inv, k_cache_ptr, v_cache_ptr, stride_c_block, stride_c_slot, stride_c_head,
                            HEAD_DIM, HAS_NORM, UNIT_OFFSET, NUM_Q_HEADS, NUM_KV_HEADS, BLOCK_SIZE)
            tl.debug_barrier()    # the block's stores before its loads (bar.sync orders memory within a block)
    else:
        q = tl.load(q_ptr + q_start.to(tl.int64) * stride_q_tok + q_head[:, None] * stride_q_head + dims[None, :],
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    q = dot_q(q, k_cache_ptr)
    table = block_tables_ptr + req.to(tl.int64) * stride_bt
    out_base = req.to(tl.int64) * stride_po_req + q_head * stride_po_head
    stat_base = req.to(tl.int64) * stride_pm_req + q_head * stride_pm_head

    for seg in range(first + split, num_segs, num_splits):
        kv_start = kv_first + seg * seg_len
        kv_end = tl.minimum(kv_start + seg_len, seq_len)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
        seg_end = kv_end + tl.zeros([BLOCK_M], tl.int32)     # every row sees the whole segment
        for tile_start in range(kv_start, kv_end, TILE_N):    # each tile holds a key: the max stays finite
            acc, m_i, l_i = attend_tile(q, acc, m_i, l_i, tile_start, kv_end, seg_end, table, kv_head,
                                        k_cache_ptr, v_cache_ptr, dims, dim_ok, scale_log2,
                                        stride_c_block, stride_c_slot, stride_c_head,
                                        BLOCK_SIZE, TILE_N, True, PRECISION, 0, SOFT_CAP)   # no key before the window
        if k_cache_ptr.dtype.element_ty == tl.float8e4nv:
            acc = acc * v_scale                           # fp8 V: its scale, once per segment
        out_off = out_base + seg * stride_po_part
        tl.store(part_out_ptr + out_off[:, None] + dims[None, :], acc, mask=row_ok[:, None] & dim_ok[None, :])
        tl.store(part_max_ptr + stat_base + seg, m_i, mask=row_ok)
        tl.store(part_sum_ptr + stat_base + seg, l_i, mask=row_ok)


@triton.jit
def _store_token_kv(row_ptr, cos_sin, kv_head, k_w_ptr, k_eps, slot, k_inv, v_inv, k_cache_ptr, v_cache_ptr,
                    stride_c_block, stride_c_slot, stride_c_head, HEAD_DIM: tl.constexpr, HAS_NORM: tl.constexpr,
                    UNIT_OFFSET: tl.constexpr, NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr):
    """One token's K (normed, rotated) and V of kv head kv_head, from its qkv row into cache slot `slot`
    (qk_norm_rope_kernel's bytes; slot -1 is padding: nothing stored)."""
    dims = tl.arange(0, HEAD_DIM)
    k_head = tl.full([1], NUM_Q_HEADS, tl.int32) + kv_head
    k = norm_rope_heads(row_ptr, k_head, k_head >= 0, k_w_ptr, k_eps, cos_sin, HEAD_DIM, HAS_NORM, UNIT_OFFSET)
    v = tl.load(row_ptr + (NUM_Q_HEADS + NUM_KV_HEADS + kv_head) * HEAD_DIM + dims).to(tl.float32)
    dst = (slot // BLOCK_SIZE) * stride_c_block + (slot % BLOCK_SIZE) * stride_c_slot + kv_head * stride_c_head + dims
    cache_dtype: tl.constexpr = k_cache_ptr.dtype.element_ty
    ok = (slot + tl.zeros([HEAD_DIM], tl.int64)) >= 0     # a full tile: the interpreter rejects scalar masks
    tl.store(k_cache_ptr + dst[None, :], cache_value(k.to(row_ptr.dtype.element_ty).to(tl.float32), k_inv,
                                                        cache_dtype), mask=ok[None, :])
    tl.store(v_cache_ptr + dst, cache_value(v, v_inv, cache_dtype), mask=ok)
