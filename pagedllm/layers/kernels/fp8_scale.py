"""The rowwise scales of an FP8 GEMM applied after it: out = acc * s_x[row] * s_w[col] (+ bias), rounded once
to the output dtype, from the float32 accumulators of a _scaled_mm run with unit per-tensor scales.

Why a second kernel: at decode sizes (a few hundred rows) torch._scaled_mm with rowwise scales runs kernels
that are slower than bf16 cuBLAS (H200, Qwen3-0.6B at M=256: 0.5-0.9x), while its per-tensor kernels run
1.1-1.3x bf16. Unit per-tensor scales and a float32 output keep the exact accumulators; this kernel then does
what the rowwise epilogue does, in float32.
"""
import torch
import triton
import triton.language as tl

BLOCK_N = 1024


@triton.jit
def fp8_scale_kernel(acc_ptr, sx_ptr, sw_ptr, bias_ptr, out_ptr, N, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    acc = tl.load(acc_ptr + row * N + cols, mask=mask, other=0.0)
    out = acc * (tl.load(sx_ptr + row) * tl.load(sw_ptr + cols, mask=mask, other=0.0))
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * N + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def fp8_scale(acc: torch.Tensor, scale: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
              out_dtype: torch.dtype) -> torch.Tensor:
    """acc (M, N) float32 contiguous, scale (M, 1) float32, weight_scale (N,) float32 -> (M, N) out_dtype."""
    m, n = acc.shape
    scale = scale.reshape(-1).contiguous()   # a view of the quant kernels' (M, 1)
    out = torch.empty((m, n), dtype=out_dtype, device=acc.device)
    if m:
        fp8_scale_kernel[(m, triton.cdiv(n, BLOCK_N))](
            acc, scale, weight_scale, bias if bias is not None else acc, out, n,
            HAS_BIAS=bias is not None, BLOCK_N=BLOCK_N, num_warps=4)
    return out
