"""Per-head RMSNorm of q and k (Qwen3's q_norm / k_norm; off for Llama, Qwen2, Mistral) and rotary embedding,
in one launch over the fused qkv projection output.

    qkv row (T, (Hq + 2*Hkv) * D):  | q head 0 .. Hq-1 | k head 0 .. Hkv-1 | v ... |
                                     \\______ the Hq + Hkv heads one grid axis tiles _____/

Program (token, head tile) loads each head as its two halves x1 = x[:D/2], x2 = x[D/2:] (rotate-half /
neox layout: the same angle rotates x1[i] and x2[i]) and writes new contiguous q (T, Hq*D), k (T, Hkv*D);
v stays a view of qkv, as in the torch path. Rounds where LlamaAttention.rotate_qk_native does.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _round(x, dtype: tl.constexpr):
    """What torch does to an elementwise result in a half dtype: round, then compute on in float32."""
    return x.to(dtype).to(tl.float32)


@triton.jit
def qk_norm_rope_kernel(
    qkv_ptr, pos_ptr, cos_sin_ptr, q_w_ptr, k_w_ptr, q_ptr, k_ptr,
    stride_qkv, stride_cos_sin, stride_q, stride_k, q_eps, k_eps,
    NUM_Q_HEADS: tl.constexpr, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr,
    BLOCK_H: tl.constexpr, HAS_NORM: tl.constexpr,
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
        x1 = _round(w1.to(tl.float32) * _round(x1 * rstd, dtype), dtype)
        x2 = _round(w2.to(tl.float32) * _round(x2 * rstd, dtype), dtype)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    cos = _round(tl.load(cos_sin_ptr + pos * stride_cos_sin + dims, mask=dims < HALF, other=0.0), dtype)[None, :]
    sin = _round(tl.load(cos_sin_ptr + pos * stride_cos_sin + HALF + dims, mask=dims < HALF, other=0.0),
                 dtype)[None, :]
    out1 = _round(x1 * cos, dtype) - _round(x2 * sin, dtype)
    out2 = _round(x2 * cos, dtype) + _round(x1 * sin, dtype)
    q_dst = q_ptr + token * stride_q + heads[:, None] * HEAD_DIM + dims[None, :]
    k_dst = k_ptr + token * stride_k + (heads[:, None] - NUM_Q_HEADS) * HEAD_DIM + dims[None, :]
    tl.store(q_dst, out1.to(dtype), mask=mask & is_q)
    tl.store(q_dst + HALF, out2.to(dtype), mask=mask & is_q)
    tl.store(k_dst, out1.to(dtype), mask=mask & ~is_q)
    tl.store(k_dst + HALF, out2.to(dtype), mask=mask & ~is_q)


def qk_norm_rope(qkv: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                 num_q_heads: int, num_kv_heads: int, head_dim: int,
                 q_norm: tuple[torch.Tensor, float] | None = None, k_norm: tuple[torch.Tensor, float] | None = None):
    """qkv (T, (Hq + 2*Hkv) * D), positions (T,), cos_sin_cache (max_pos, D) float32 [cos | sin];
    q_norm / k_norm: (weight (D,), eps), both or neither -> q (T, Hq*D), k (T, Hkv*D), v (T, Hkv*D) view."""
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
    k = torch.empty((num_tokens, kv_size), dtype=qkv.dtype, device=qkv.device)
    v = qkv[:, q_size + kv_size:]
    num_heads = num_q_heads + num_kv_heads
    half_pad = triton.next_power_of_2(head_dim // 2)
    block_h = min(triton.next_power_of_2(num_heads), max(1, 512 // half_pad))   # tiles of ~512 per half
    if num_tokens > 0:
        (q_w, q_eps), (k_w, k_eps) = q_norm or (qkv, 0.0), k_norm or (qkv, 0.0)
        qk_norm_rope_kernel[(num_tokens, triton.cdiv(num_heads, block_h))](
            qkv, positions, cos_sin_cache, q_w, k_w, q, k,
            qkv.stride(0), cos_sin_cache.stride(0), q.stride(0), k.stride(0), q_eps, k_eps,
            NUM_Q_HEADS=num_q_heads, NUM_HEADS=num_heads, HEAD_DIM=head_dim,
            HALF_PAD=half_pad, BLOCK_H=block_h, HAS_NORM=q_norm is not None,
            num_warps=4)
    return q, k, v
