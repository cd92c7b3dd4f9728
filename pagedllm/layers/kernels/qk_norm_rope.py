"""Per-head RMSNorm of q and k (Qwen3's q_norm / k_norm; off for Llama, Qwen2, Mistral) and rotary embedding,
in one launch over the fused qkv projection output.

    qkv row (T, (Hq + 2*Hkv) * D):  | q head 0 .. Hq-1 | k head 0 .. Hkv-1 | v ... |
                                     \\______ the Hq + Hkv heads one grid axis tiles _____/

Program (token, head tile) loads each head as its two halves x1 = x[:D/2], x2 = x[D/2:] (rotate-half /
neox layout: the same angle rotates x1[i] and x2[i]) and writes new contiguous q (T, Hq*D), k (T, Hkv*D);
v stays a view of qkv, as in the torch path. Rounds where LlamaAttention.rotate_qk_native does.

Given the layer's KV cache, it stores each token's rotated K and its V in the token's slot instead of returning
k (the bytes reshape_and_cache writes, fp8 scaling included; slot -1 is padding): one launch a layer less
(H200, 2026-12-05: W1 +0.9%; W5 with a draft model 4.10 -> 4.01 ms a token, its steps being small kernels).

With UNIT_OFFSET (Gemma 3's q_norm / k_norm, GemmaRMSNorm) each head is normed with Gemma's arithmetic: the
normed head stays float32, times (1 + weight) in float32, rounded once (rms_norm.py's flag). A compile-time
constant: off, the kernels are Llama's.

norm_rope_heads and cache_value are the same arithmetic for a kernel that takes whole heads (decode_partition
in decode-only steps, where it replaces this kernel's launch).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _round(x, dtype: tl.constexpr):
    """What torch does to an elementwise result in a half dtype: round, then compute on in float32."""
    return x.to(dtype).to(tl.float32)


@triton.jit
def _norm_scale(x, rstd, w, dtype: tl.constexpr, UNIT_OFFSET: tl.constexpr):
    """A normed value x * rstd scaled by its weight w, rounded where torch rounds: Llama's (RMSNorm._norm) rounds
    the normed value, then the product; Gemma's (UNIT_OFFSET) multiplies by (1 + w) in float32, one rounding."""
    if UNIT_OFFSET:
        return _round(x * rstd * (1.0 + w.to(tl.float32)), dtype)
    return _round(w.to(tl.float32) * _round(x * rstd, dtype), dtype)


@triton.jit
def cache_value(x, inv, cache_dtype: tl.constexpr):
    """x (float32, already rounded to the model's dtype) as the KV cache stores it: an fp8 cache x / scale in
    float32, clamped to e4m3's range (reshape_and_cache's arithmetic)."""
    if cache_dtype == tl.float8e4nv:
        x = tl.minimum(tl.maximum(x * inv, -448.0), 448.0)
    return x.to(cache_dtype)


@triton.jit
def norm_rope_heads(row_ptr, heads, head_ok, w_ptr, eps, cos_sin_ptr, HEAD_DIM: tl.constexpr,
                    HAS_NORM: tl.constexpr, UNIT_OFFSET: tl.constexpr):
    """Heads `heads` (R,) of one token's qkv row (row_ptr), whole: (R, HEAD_DIM) float32, normed (HAS_NORM:
    weight w_ptr; UNIT_OFFSET: Gemma's norm) and rotated by the token's [cos | sin] row (cos_sin_ptr), rounded
    where qk_norm_rope_kernel rounds (its variance may sum in another order). Each value's rotate-half partner is
    loaded alongside (d XOR HALF), so no tile is split or joined. HEAD_DIM a power of two."""
    HALF: tl.constexpr = HEAD_DIM // 2
    dtype: tl.constexpr = row_ptr.dtype.element_ty
    dims = tl.arange(0, HEAD_DIM)
    partner = dims ^ HALF
    src = row_ptr + heads[:, None] * HEAD_DIM
    x = tl.load(src + dims[None, :], mask=head_ok[:, None], other=0.0).to(tl.float32)
    xp = tl.load(src + partner[None, :], mask=head_ok[:, None], other=0.0).to(tl.float32)
    if HAS_NORM:
        rstd = (1.0 / tl.sqrt_rn(tl.sum(x * x, axis=1) / HEAD_DIM + eps))[:, None]
        x = _norm_scale(x, rstd, tl.load(w_ptr + dims)[None, :], dtype, UNIT_OFFSET)
        xp = _norm_scale(xp, rstd, tl.load(w_ptr + partner)[None, :], dtype, UNIT_OFFSET)
    angle = dims % HALF
    cos = _round(tl.load(cos_sin_ptr + angle), dtype)[None, :]
    sin = _round(tl.load(cos_sin_ptr + HALF + angle), dtype)
    sin = tl.where(dims < HALF, -sin, sin)[None, :]          # x1 * cos - x2 * sin | x2 * cos + x1 * sin
    return _round(x * cos, dtype) + _round(xp * sin, dtype)


@triton.jit
def qk_norm_rope_kernel(
    qkv_ptr, pos_ptr, cos_sin_ptr, q_w_ptr, k_w_ptr, q_ptr, k_ptr,
    stride_qkv, stride_cos_sin, stride_q, stride_k, q_eps, k_eps,
    k_cache_ptr, v_cache_ptr, slot_ptr, k_inv, v_inv, stride_c_block, stride_c_slot, stride_c_head,
    NUM_Q_HEADS: tl.constexpr, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr,
    BLOCK_H: tl.constexpr, HAS_NORM: tl.constexpr, UNIT_OFFSET: tl.constexpr, WRITE_CACHE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    HALF: tl.constexpr = HEAD_DIM // 2
    dtype: tl.constexpr = qkv_ptr.dtype.element_ty
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)          # over q heads, then k heads
    dims = tl.arange(0, HALF_PAD)
    mask = (heads < NUM_HEADS)[:, None] & (dims < HALF)[None, :]
    is_q = (heads < NUM_Q_HEADS)[:, None]
    src = qkv_ptr + token * stride_qkv + heads[:, None] * HEAD_DIM + dims[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)              # (BLOCK_H, HALF_PAD)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        variance = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / HEAD_DIM
        eps = tl.where(heads < NUM_Q_HEADS, q_eps, k_eps)
        rstd = (1.0 / tl.sqrt_rn(variance + eps))[:, None]
        dmask = dims < HALF
        w1 = tl.where(is_q, tl.load(q_w_ptr + dims, mask=dmask)[None, :], tl.load(k_w_ptr + dims, mask=dmask)[None, :])
        w2 = tl.where(is_q, tl.load(q_w_ptr + HALF + dims, mask=dmask)[None, :],
                      tl.load(k_w_ptr + HALF + dims, mask=dmask)[None, :])
        x1 = _norm_scale(x1, rstd, w1, dtype, UNIT_OFFSET)
        x2 = _norm_scale(x2, rstd, w2, dtype, UNIT_OFFSET)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    cos = _round(tl.load(cos_sin_ptr + pos * stride_cos_sin + dims, mask=dims < HALF, other=0.0), dtype)[None, :]
    sin = _round(tl.load(cos_sin_ptr + pos * stride_cos_sin + HALF + dims, mask=dims < HALF, other=0.0),
                 dtype)[None, :]
    out1 = _round(x1 * cos, dtype) - _round(x2 * sin, dtype)
    out2 = _round(x2 * cos, dtype) + _round(x1 * sin, dtype)
    q_dst = q_ptr + token * stride_q + heads[:, None] * HEAD_DIM + dims[None, :]
    tl.store(q_dst, out1.to(dtype), mask=mask & is_q)
    tl.store(q_dst + HALF, out2.to(dtype), mask=mask & is_q)
    kv_head = heads[:, None] - NUM_Q_HEADS
    if WRITE_CACHE:
        slot = tl.load(slot_ptr + token).to(tl.int64)
        # slot >= 0 as a full tile: the interpreter rejects a mask broadcast from a scalar
        c_mask = mask & ~is_q & (tl.full([BLOCK_H, HALF_PAD], 0, tl.int64) + slot >= 0)
        c_dst = (slot // BLOCK_SIZE) * stride_c_block + (slot % BLOCK_SIZE) * stride_c_slot \
            + kv_head * stride_c_head + dims[None, :]
        v_src = qkv_ptr + token * stride_qkv + (NUM_HEADS + kv_head) * HEAD_DIM + dims[None, :]
        v1 = tl.load(v_src, mask=c_mask, other=0.0).to(tl.float32)
        v2 = tl.load(v_src + HALF, mask=c_mask, other=0.0).to(tl.float32)
        cache_dtype: tl.constexpr = k_cache_ptr.dtype.element_ty
        tl.store(k_cache_ptr + c_dst, cache_value(_round(out1, dtype), k_inv, cache_dtype), mask=c_mask)
        tl.store(k_cache_ptr + c_dst + HALF, cache_value(_round(out2, dtype), k_inv, cache_dtype), mask=c_mask)
        tl.store(v_cache_ptr + c_dst, cache_value(v1, v_inv, cache_dtype), mask=c_mask)
        tl.store(v_cache_ptr + c_dst + HALF, cache_value(v2, v_inv, cache_dtype), mask=c_mask)
    else:
        k_dst = k_ptr + token * stride_k + kv_head * HEAD_DIM + dims[None, :]
        tl.store(k_dst, out1.to(dtype), mask=mask & ~is_q)
        tl.store(k_dst + HALF, out2.to(dtype), mask=mask & ~is_q)


def qk_norm_rope(qkv: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                 num_q_heads: int, num_kv_heads: int, head_dim: int,
                 q_norm: tuple[torch.Tensor, float] | None = None, k_norm: tuple[torch.Tensor, float] | None = None,
                 kv_cache: torch.Tensor | None = None, slot_mapping: torch.Tensor | None = None,
                 k_scale: float = 1.0, v_scale: float = 1.0, unit_offset: bool = False):
    """qkv (T, (Hq + 2*Hkv) * D), positions (T,), cos_sin_cache (max_pos, D) float32 [cos | sin];
    q_norm / k_norm: (weight (D,), eps), both or neither -> q (T, Hq*D), k (T, Hkv*D), v (T, Hkv*D) view;
    unit_offset: the norms are Gemma's, (1 + weight) in float32 (the module docstring).
    Given kv_cache (2, blocks, block_size, Hkv, D) and slot_mapping (T,): K and V go into token i's slot
    (as triton_backend.write_kv with k_scale / v_scale) and k, v are returned as None."""
    num_tokens = qkv.shape[0]
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
    if qkv.dim() != 2 or qkv.shape[1] != q_size + 2 * kv_size or qkv.stride(1) != 1 or head_dim % 2:
        raise ValueError(f"qk_norm_rope: qkv {tuple(qkv.shape)} is not (T, (Hq + 2*Hkv) * D) with Hq={num_q_heads}, "
                         f"Hkv={num_kv_heads}, D={head_dim} (D even, rows contiguous)")
    if cos_sin_cache.shape[1] != head_dim or cos_sin_cache.stride(1) != 1 or positions.shape != (num_tokens,):
        raise ValueError(f"qk_norm_rope: cos_sin_cache {tuple(cos_sin_cache.shape)} / positions "
                         f"{tuple(positions.shape)} do not fit D={head_dim}, T={num_tokens}")
    if (q_norm is None) != (k_norm is None):
        raise ValueError("qk_norm_rope: pass both q_norm and k_norm, or neither")
    q = torch.empty((num_tokens, q_size), dtype=qkv.dtype, device=qkv.device)
    if kv_cache is None:
        k, v = torch.empty((num_tokens, kv_size), dtype=qkv.dtype, device=qkv.device), qkv[:, q_size + kv_size:]
        k_cache = v_cache = slots = k
        k_inv = v_inv = 1.0
        c_strides, block_size = (0, 0, 0), 1
    else:
        k = v = None
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        if k_cache.shape[2:] != (num_kv_heads, head_dim) or k_cache.stride(3) != 1:
            raise ValueError(f"qk_norm_rope: KV cache {tuple(k_cache.shape)} is not (blocks, block_size, "
                             f"{num_kv_heads}, {head_dim}) with head_dim contiguous")
        slots, k_inv, v_inv = slot_mapping, 1.0 / k_scale, 1.0 / v_scale
        c_strides, block_size = k_cache.stride()[:3], k_cache.shape[1]
    num_heads = num_q_heads + num_kv_heads
    half_pad = triton.next_power_of_2(head_dim // 2)
    block_h = min(triton.next_power_of_2(num_heads), max(1, 512 // half_pad))   # tiles of ~512 per half
    if num_tokens > 0:
        (q_w, q_eps), (k_w, k_eps) = q_norm or (qkv, 0.0), k_norm or (qkv, 0.0)
        qk_norm_rope_kernel[(num_tokens, triton.cdiv(num_heads, block_h))](
            qkv, positions, cos_sin_cache, q_w, k_w, q, k if k is not None else q,
            qkv.stride(0), cos_sin_cache.stride(0), q.stride(0), kv_size, q_eps, k_eps,
            k_cache, v_cache, slots, k_inv, v_inv, *c_strides,
            NUM_Q_HEADS=num_q_heads, NUM_HEADS=num_heads, HEAD_DIM=head_dim,
            HALF_PAD=half_pad, BLOCK_H=block_h, HAS_NORM=q_norm is not None, UNIT_OFFSET=unit_offset,
            WRITE_CACHE=kv_cache is not None, BLOCK_SIZE=block_size, num_warps=4)
    return q, k, v
