"""RMSNorm, optionally after a residual add, in one launch: one program per token row.

Per row, the same steps as RMSNorm.forward_native (rounding to the activations' dtype where torch does):
    s = round(x + residual)                    (returned as the new residual)
    normed = round(s * 1 / sqrt(mean(s^2) + eps))
    out = round(weight * normed)
With UNIT_OFFSET, Gemma's (GemmaRMSNorm._norm, models/gemma.py): the normed row stays float32, is scaled by
(1 + weight) in float32 and rounded once,
    out = round(s * 1 / sqrt(mean(s^2) + eps) * (1 + weight))
A compile-time constant: off, the kernel is the one above.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def rms_norm_row(x_ptr, res_ptr, w_ptr, res_out_ptr, row, cols, mask, stride_x, stride_res, stride_res_out,
                 n_cols, eps, HAS_RESIDUAL: tl.constexpr, UNIT_OFFSET: tl.constexpr):
    """One row's weight * normed (UNIT_OFFSET: (1 + weight) * normed) in float32, before its final rounding; with
    HAS_RESIDUAL, stores x + residual. Also the first half of fused_quant_fp8.rms_norm_quant_kernel."""
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_res_out + cols, x, mask=mask)
    xf = x.to(tl.float32)
    variance = tl.sum(xf * xf, axis=0) / n_cols
    if UNIT_OFFSET:   # a bf16 weight + 1 rounded to bf16 would lose the weight's low bits: add in float32
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        return xf * (1.0 / tl.sqrt_rn(variance + eps)) * (1.0 + w.to(tl.float32))
    normed = (xf * (1.0 / tl.sqrt_rn(variance + eps))).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    return w.to(tl.float32) * normed.to(tl.float32)


@triton.jit
def rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    stride_x, stride_res, stride_out, stride_res_out, n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, UNIT_OFFSET: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    out = rms_norm_row(x_ptr, res_ptr, w_ptr, res_out_ptr, row, cols, mask, stride_x, stride_res, stride_res_out,
                       n_cols, eps, HAS_RESIDUAL, UNIT_OFFSET)
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             unit_offset: bool = False):
    """x (..., C) -> weight * norm(x); with residual: (weight * norm(x + residual), x + residual).
    unit_offset: Gemma's (1 + weight) * norm(x), in float32 (the module docstring).

    Output dtypes are torch's: the norm's is promote(weight, x) (Gemma's: x's), the residual's is x's."""
    n_cols = x.shape[-1]
    if weight.shape != (n_cols,):
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not fit hidden size {n_cols}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"rms_norm: residual {tuple(residual.shape)} {residual.dtype} "
                         f"must match x {tuple(x.shape)} {x.dtype}")
    x2 = x.reshape(-1, n_cols)     # a view for the (T, C) rows of a linear layer; strided rows are fine
    res2 = residual.reshape(-1, n_cols) if residual is not None else x2
    if x2.stride(-1) != 1 or res2.stride(-1) != 1:
        x2, res2 = x2.contiguous(), res2.contiguous()
    out_dtype = x.dtype if unit_offset else torch.promote_types(x.dtype, weight.dtype)
    out = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    res_out = torch.empty_like(x2, memory_format=torch.contiguous_format) if residual is not None else out
    if x2.shape[0] > 0:
        block = triton.next_power_of_2(n_cols)
        rms_norm_kernel[(x2.shape[0],)](
            x2, res2, weight, out, res_out,
            x2.stride(0), res2.stride(0), out.stride(0), res_out.stride(0), n_cols, eps,
            HAS_RESIDUAL=residual is not None, UNIT_OFFSET=unit_offset, BLOCK=block, num_warps=_num_warps(block))
    out = out.view(x.shape)
    return out if residual is None else (out, res_out.view(x.shape))


def _num_warps(block: int) -> int:
    """About 8 elements a thread (16-byte bf16 loads), 1 to 16 warps."""
    return max(1, min(16, block // 256))
