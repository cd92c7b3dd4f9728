"""The online-softmax step over one tile of paged keys, shared by the decode and prefill kernels.

    keys of a tile:  t = tile_start .. tile_start + TILE_N - 1, in slot block_table[t // BLOCK_SIZE], t % BLOCK_SIZE

An fp8 cache (a compile-time branch on the cache pointer's element type; other caches compile as before):
K and V are converted to q's dtype for tl.dot (exact: e4m3 fits bf16 and fp16); k_scale is folded into the
caller's scale_log2 and v_scale applied to the caller's output, so the tile does no per-element scaling.
Callers pass q through dot_q first: a bf16 q becomes fp16, so both dots run in fp16. Why: e4m3 -> fp16 is one
conversion instruction per pair on sm_89+, e4m3 -> bf16 goes through fp16, and with half the bytes to read the
conversion is what a tile waits on. H200, decode kernel, Qwen3-0.6B heads (fp8_decode_variants.py at 2122c68):
W1's 256 rows 325.5 -> 291.0 us (bf16 cache: 291.3), 32 x 30k 966 -> 856 us (bf16: 910). Not less exact: fp16
holds every bf16 value from 2^-14 to 65504 exactly (q is clamped to that range) and p in [0, 1] with 3 more bits.

A layer's sliding window and logit soft cap are compile-time constants (WINDOW 0, SOFT_CAP 0.0: off, and the
kernels compile as without them): row m sees keys causal_end[m] - WINDOW .. causal_end[m] - 1, and a score x
becomes SOFT_CAP * tanh(x / SOFT_CAP) before the softmax.
"""
import triton
import triton.language as tl


@triton.jit
def load_kv_tile(q, tile_start, kv_stop, table, kv_head, k_cache_ptr, v_cache_ptr, dims, dim_ok,
                 stride_c_block, stride_c_slot, stride_c_head, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr):
    """Keys tile_start .. tile_start + TILE_N - 1 of one kv head: their positions, which are below kv_stop (the
    others are not loaded: zeros), and K and V (TILE_N, HEAD_PAD), an fp8 cache's converted to q's dtype."""
    keys = tile_start + tl.arange(0, TILE_N)
    key_ok = keys < kv_stop
    block = tl.load(table + keys // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
    kv_off = block * stride_c_block + (keys % BLOCK_SIZE) * stride_c_slot + kv_head * stride_c_head
    kv_mask = key_ok[:, None] & dim_ok[None, :]
    k = tl.load(k_cache_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_cache_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
    if k_cache_ptr.dtype.element_ty == tl.float8e4nv:
        k = k.to(q.dtype)
        v = v.to(q.dtype)
    return keys, key_ok, k, v


@triton.jit
def attend_tile(q, acc, m_i, l_i, tile_start, kv_stop, causal_end, table, kv_head, k_cache_ptr, v_cache_ptr,
                dims, dim_ok, scale_log2, stride_c_block, stride_c_slot, stride_c_head,
                BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr,
                WINDOW: tl.constexpr, SOFT_CAP: tl.constexpr):
    """One online-softmax step over keys tile_start .. tile_start + TILE_N - 1 for the rows of q.

    Keys at or past kv_stop are not loaded. MASKED: row m also drops keys at or past causal_end[m] (the
    causal bound, or kv_stop itself), and with WINDOW keys before causal_end[m] - WINDOW; unmasked tiles must
    hold only keys every row sees. Without WINDOW every tile must leave each row at least one visible key, so
    that the running max stays finite; with it a row may see none yet (its window starts later)."""
    keys, key_ok, k, v = load_kv_tile(q, tile_start, kv_stop, table, kv_head, k_cache_ptr, v_cache_ptr, dims,
                                      dim_ok, stride_c_block, stride_c_slot, stride_c_head, BLOCK_SIZE, TILE_N)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
    if SOFT_CAP > 0:     # a float: compiled `if` takes bools and ints only
        s = soft_cap(s, SOFT_CAP)
    if MASKED:
        visible = (keys[None, :] < causal_end[:, None]) & key_ok[None, :]
        if WINDOW:
            visible = visible & (keys[None, :] >= causal_end[:, None] - WINDOW)
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_ref = m_new
    if WINDOW:   # a row that has seen no key yet: exp2 against 0, not -inf (-inf - -inf is NaN); p and alpha 0
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_ref[:, None])
    alpha = tl.math.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def soft_cap(s, CAP: tl.constexpr):
    """Scores in log2 units (s = x * log2(e), x the natural score x = q . k * scale) capped as x -> CAP * tanh(x /
    CAP), still in log2 units: CAP * log2(e) * tanh(x / CAP). tanh(y) = 1 - 2 / (e^2y + 1), e^2y = 2^(s * 2 / CAP):
    one exp2 (the interpreter has no tanh); +-inf saturate to +-1, never NaN."""
    cap_log2: tl.constexpr = CAP * 1.4426950408889634
    e2y = tl.math.exp2(s * (2.0 / CAP))
    return cap_log2 - (2.0 * cap_log2) / (e2y + 1.0)


@triton.jit
def dot_q(q, k_cache_ptr):
    """q as attend_tile's dots take it: fp16 in place of bf16 with an fp8 cache (see the module doc), else q."""
    if k_cache_ptr.dtype.element_ty == tl.float8e4nv and q.dtype == tl.bfloat16:
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
    return q
