"""Paged attention for rows with more than one query token: fresh prompts, and chunks whose earlier
context already sits in the cache (chunked prefill, prefix-cache hits). Decode rows (one query token)
return at once: decode_partition serves them.

Rows of long_query_len or more new tokens return too: cudnn_prefill serves them.

Grid (num_q_blocks, num_kv_heads). Each request's queries are cut into blocks of BLOCK_Q tokens; q block
b of request i is program  query_start_loc[i] // BLOCK_Q + i + b,  so the program finds its request by a
binary search over query_start_loc (no host-side list). A program's tile rows are its BLOCK_Q tokens times
the query heads of one kv head, so each K/V tile is loaded once for the whole group:

    row m = token (m // GROUP_PAD) of the block, query head kv_head * GROUP + (m % GROUP_PAD)

Causal with offset: token j of a request with seq_len S and query_len L sees keys 0 .. S - L + j. Key
tiles every row may see run unmasked; the tiles past the block's first token are masked; tiles past its
last token are never loaded.

With a sliding WINDOW (a compile-time constant; 0: off) token j sees keys S - L + j - WINDOW + 1 .. S - L + j
only. The block starts at the tile of its first token's first key (no tile wholly before it is loaded), and
the tiles that hold a key some row's window leaves out are masked too:

    keys   lo ...... win_end ......... unmasked_end ..... kv_stop
           | window-masked | unmasked  | causal-masked    |      (tiles; win_end past unmasked_end: all masked)

SOFT_CAP caps the scores (attend_tile).
"""
import triton
import triton.language as tl

from pagedllm.attention.kernels.attend_tile import attend_tile, dot_q


@triton.jit
def _find_request(query_start_loc_ptr, num_reqs, q_block, BLOCK_Q: tl.constexpr):
    """The last request i with query_start_loc[i] // BLOCK_Q + i <= q_block."""
    lo, hi = 0, num_reqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


# num_reqs changes every step: specializing on it (== 1, % 16) would compile new variants mid-run.
@triton.jit(do_not_specialize=["num_reqs", "long_query_len"])
def prefill_attention_kernel(
    q_ptr, out_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    num_reqs, long_query_len, scale_log2, v_scale,
    stride_q_tok, stride_q_head, stride_o_tok, stride_o_head, stride_bt,
    stride_c_block, stride_c_slot, stride_c_head,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, PRECISION: tl.constexpr,
    WINDOW: tl.constexpr, SOFT_CAP: tl.constexpr,
):
    # Highest q block first: the last blocks of a request see the most keys, so they start early and
    # the short ones fill the tail.
    q_block, kv_head = tl.num_programs(0) - 1 - tl.program_id(0), tl.program_id(1)
    req = _find_request(query_start_loc_ptr, num_reqs, q_block, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + req)
    query_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    first = (q_block - (q_start // BLOCK_Q + req)) * BLOCK_Q      # first query token of this block
    if query_len <= 1 or query_len >= long_query_len or first >= query_len:
        return
    context_len = tl.load(seq_lens_ptr + req) - query_len

    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD
    rows = tl.arange(0, BLOCK_M)
    token, head = first + rows // GROUP_PAD, rows % GROUP_PAD
    row_ok = (token < query_len) & (head < GROUP)
    dims = tl.arange(0, HEAD_PAD)
    dim_ok = dims < HEAD_DIM
    q_head = kv_head * GROUP + head
    q_off = (q_start + token).to(tl.int64) * stride_q_tok + q_head * stride_q_head
    io_mask = row_ok[:, None] & dim_ok[None, :]
    q = dot_q(tl.load(q_ptr + q_off[:, None] + dims[None, :], mask=io_mask, other=0.0), k_cache_ptr)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    table = block_tables_ptr + req.to(tl.int64) * stride_bt
    causal_end = context_len + token + 1              # row m sees keys < causal_end[m]
    last = tl.minimum(first + BLOCK_Q, query_len) - 1
    kv_stop = context_len + last + 1                  # no row of the block sees a key past this
    unmasked_end = (context_len + first + 1) // TILE_N * TILE_N   # every row sees all keys before this
    unmasked_start = 0
    masked_start = unmasked_end
    if WINDOW:
        # the first token's first key: no row sees a key before it; the last token's: every row sees the keys
        # from it on (up to its own causal bound)
        lo = tl.maximum(context_len + first + 1 - WINDOW, 0) // TILE_N * TILE_N
        win_end = tl.cdiv(tl.maximum(kv_stop - WINDOW, 0), TILE_N) * TILE_N
        for tile_start in range(lo, win_end, TILE_N):
            acc, m_i, l_i = attend_tile(q, acc, m_i, l_i, tile_start, kv_stop, causal_end, table, kv_head,
                                         k_cache_ptr, v_cache_ptr, dims, dim_ok, scale_log2,
                                         stride_c_block, stride_c_slot, stride_c_head,
                                         BLOCK_SIZE, TILE_N, True, PRECISION, WINDOW, SOFT_CAP)
        unmasked_start = win_end           # >= lo: the last token's first key is past the first token's
        masked_start = tl.maximum(unmasked_end, win_end)
    # every row sees every key of these tiles (without WINDOW key 0 is in the first): no mask, the max finite
    for tile_start in range(unmasked_start, unmasked_end, TILE_N):
        acc, m_i, l_i = attend_tile(q, acc, m_i, l_i, tile_start, kv_stop, causal_end, table, kv_head,
                                     k_cache_ptr, v_cache_ptr, dims, dim_ok, scale_log2,
                                     stride_c_block, stride_c_slot, stride_c_head,
                                     BLOCK_SIZE, TILE_N, False, PRECISION, 0, SOFT_CAP)
    for tile_start in range(masked_start, kv_stop, TILE_N):
        acc, m_i, l_i = attend_tile(q, acc, m_i, l_i, tile_start, kv_stop, causal_end, table, kv_head,
                                     k_cache_ptr, v_cache_ptr, dims, dim_ok, scale_log2,
                                     stride_c_block, stride_c_slot, stride_c_head,
                                     BLOCK_SIZE, TILE_N, True, PRECISION, WINDOW, SOFT_CAP)

    out = acc / l_i[:, None]
    if k_cache_ptr.dtype.element_ty == tl.float8e4nv:
        out = out * v_scale                               # fp8 V: its scale
    o_off = (q_start + token).to(tl.int64) * stride_o_tok + q_head * stride_o_head
    tl.store(out_ptr + o_off[:, None] + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=io_mask)
