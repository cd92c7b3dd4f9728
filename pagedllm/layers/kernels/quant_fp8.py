"""Per-token FP8 quantization of activations: x (M, K) -> q (M, K) float8_e4m3fn, scale (M, 1) float32.

One program per row. A row of up to MAX_BLOCK elements is read once and held in registers (the two-pass
version took 143 us for W2's 8192 x 14336 down_proj input on an H200, ~3x the bytes' time); a longer one
takes two passes in BLOCK tiles: the row's absmax, then x / scale clamped to +-448 and cast.
Dynamic: scale = max(absmax * float32(1 / 448), SCALE_EPS) (fp8.py says why a multiply);
static: the given scalar scale. Bit-exact with pagedllm.layers.quantization.fp8.quantize_per_token: x / scale
an IEEE division (div_rn; Triton's `/` on float32 is approximate), absmax exact in any dtype.

The fused variants (fused_quant_fp8.py: RMSNorm or SiLU-and-mul, then quantize) share quantize_row.
"""
import torch
import triton
import triton.language as tl

from pagedllm.layers.quantization.fp8 import FP8, FP8_MAX, INV_FP8_MAX, SCALE_EPS

MAX_BLOCK = 16384
# A jitted function reads a module global only as a constexpr. float32(1/448) is exact in fp32, so the kernel
# multiplies by the same number as the torch path (fp8.py).
_INV_FP8_MAX = tl.constexpr(INV_FP8_MAX)


@triton.jit
def _row_scale(x_row, n_cols, FP8_MAX: tl.constexpr, EPS: tl.constexpr, BLOCK: tl.constexpr):
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    return tl.maximum(tl.max(amax, axis=0) * _INV_FP8_MAX, EPS)


@triton.jit
def _store_quantized(x, scale, q_ptrs, mask, FP8_MAX: tl.constexpr):
    q = tl.math.div_rn(x, scale)
    q = tl.minimum(tl.maximum(q, -FP8_MAX), FP8_MAX)   # the cast does not saturate
    tl.store(q_ptrs, q.to(q_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def quantize_row(x, q_ptrs, mask, scale_ptr, FP8_MAX: tl.constexpr, EPS: tl.constexpr):
    """A whole row x (float32, masked lanes 0) in registers: its dynamic scale and fp8 values."""
    scale = tl.maximum(tl.max(tl.abs(x), axis=0) * _INV_FP8_MAX, EPS)
    tl.store(scale_ptr, scale)
    _store_quantized(x, scale, q_ptrs, mask, FP8_MAX)


@triton.jit
def per_token_quant_kernel(x_ptr, q_ptr, scale_ptr, static_scale_ptr, stride_x, stride_q, n_cols,
                           STATIC: tl.constexpr, ONE_PASS: tl.constexpr, FP8_MAX: tl.constexpr, EPS: tl.constexpr,
                           BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    if ONE_PASS:   # dynamic, and the whole row fits one BLOCK
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        quantize_row(x, q_ptr + row * stride_q + cols, mask, scale_ptr + row, FP8_MAX, EPS)
    else:
        if STATIC:
            scale = tl.load(static_scale_ptr)
        else:
            scale = _row_scale(x_row, n_cols, FP8_MAX, EPS, BLOCK)
        tl.store(scale_ptr + row, scale)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            _store_quantized(x, scale, q_ptr + row * stride_q + cols, mask, FP8_MAX)


def per_token_quant_fp8(x: torch.Tensor, static_scale: torch.Tensor | None = None):
    """x (M, K) with unit column stride -> (q (M, K) float8_e4m3fn, scale (M, 1) float32).
    static_scale: a one-element float32 tensor (the checkpoint's input_scale), else the scale is per row."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    num_rows, n_cols = x.shape
    q = torch.empty((num_rows, n_cols), dtype=FP8, device=x.device)
    scale = torch.empty((num_rows, 1), dtype=torch.float32, device=x.device)
    if num_rows == 0:
        return q, scale
    block = min(triton.next_power_of_2(n_cols), MAX_BLOCK)
    per_token_quant_kernel[(num_rows,)](
        x, q, scale, static_scale if static_scale is not None else scale, x.stride(0), q.stride(0), n_cols,
        STATIC=static_scale is not None, ONE_PASS=static_scale is None and block >= n_cols,
        FP8_MAX=FP8_MAX, EPS=SCALE_EPS, BLOCK=block,
        num_warps=max(4, min(16, block // 512)))
    return q, scale
