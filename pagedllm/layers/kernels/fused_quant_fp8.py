"""RMSNorm and SiLU- or GeLU(tanh)-and-mul with the next FP8 linear's per-token quantization in the same launch.

The unfused path writes the op's output in the model dtype, then the quant kernel reads it back: for W2's
16k-token steps that is ~0.5 GB of traffic per MLP for the activation alone. Here one program holds a whole
row in registers: the op's value, rounded to the model dtype exactly as the unfused op rounds it, then the
row's scale and the fp8 row, the bytes per_token_quant_fp8 would write from the unfused output.
"""
import torch
import triton
import triton.language as tl

from pagedllm.layers.kernels.quant_fp8 import quantize_row
from pagedllm.layers.kernels.rms_norm import rms_norm_row
from pagedllm.layers.kernels.silu_and_mul import activation
from pagedllm.layers.quantization.fp8 import FP8, FP8_MAX, SCALE_EPS

@triton.jit
def rms_norm_quant_kernel(
    x_ptr, res_ptr, w_ptr, q_ptr, scale_ptr, res_out_ptr,
    stride_x, stride_res, stride_q, stride_res_out, n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, FP8_MAX: tl.constexpr, EPS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    out = rms_norm_row(x_ptr, res_ptr, w_ptr, res_out_ptr, row, cols, mask, stride_x, stride_res, stride_res_out,
                       n_cols, eps, HAS_RESIDUAL, False)   # Llama's norm (Gemma's layers are not fused)
    out = out.to(x_ptr.dtype.element_ty).to(tl.float32)   # rounded as rms_norm's output is, then quantized
    quantize_row(out, q_ptr + row * stride_q + cols, mask, scale_ptr + row, FP8_MAX, EPS)


@triton.jit
def silu_and_mul_quant_kernel(gate_up_ptr, q_ptr, scale_ptr, stride_in, stride_q, n_cols, ACT: tl.constexpr,
                              FP8_MAX: tl.constexpr, EPS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(gate_up_ptr + row * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_in + n_cols + cols, mask=mask, other=0.0)
    act = activation(gate, ACT).to(up.dtype)   # silu_and_mul's roundings
    out = (act.to(tl.float32) * up.to(tl.float32)).to(up.dtype).to(tl.float32)
    quantize_row(out, q_ptr + row * stride_q + cols, mask, scale_ptr + row, FP8_MAX, EPS)


def rms_norm_quant_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """x (T, C) -> (q (T, C) fp8, scale (T, 1) float32) of weight * norm(x [+ residual]) in x's dtype;
    with residual also x + residual, as rms_norm returns it."""
    n_cols = x.shape[-1]
    x2 = x.reshape(-1, n_cols)
    res2 = residual.reshape(-1, n_cols) if residual is not None else x2
    if x2.stride(-1) != 1 or res2.stride(-1) != 1:
        x2, res2 = x2.contiguous(), res2.contiguous()
    q = torch.empty(x2.shape, dtype=FP8, device=x.device)
    scale = torch.empty((x2.shape[0], 1), dtype=torch.float32, device=x.device)
    res_out = torch.empty_like(x2, memory_format=torch.contiguous_format) if residual is not None else x2
    if x2.shape[0] > 0:
        block = triton.next_power_of_2(n_cols)
        rms_norm_quant_kernel[(x2.shape[0],)](
            x2, res2, weight, q, scale, res_out,
            x2.stride(0), res2.stride(0), q.stride(0), res_out.stride(0), n_cols, eps,
            HAS_RESIDUAL=residual is not None, FP8_MAX=FP8_MAX, EPS=SCALE_EPS, BLOCK=block,
            num_warps=_num_warps(block))
    return (q, scale) if residual is None else ((q, scale), res_out.view(x.shape))


def silu_and_mul_quant_fp8(gate_up: torch.Tensor, act: str = "silu"):
    """gate_up (T, 2I), gate first -> (q (T, I) fp8, scale (T, 1) float32) of act(gate) * up in its dtype;
    act "silu" or "gelu_tanh" (silu_and_mul's)."""
    n_cols = gate_up.shape[-1] // 2
    x = gate_up.reshape(-1, 2 * n_cols)
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = torch.empty((x.shape[0], n_cols), dtype=FP8, device=x.device)
    scale = torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device)
    if x.shape[0] > 0:
        block = triton.next_power_of_2(n_cols)
        silu_and_mul_quant_kernel[(x.shape[0],)](
            x, q, scale, x.stride(0), q.stride(0), n_cols, ACT=act, FP8_MAX=FP8_MAX, EPS=SCALE_EPS, BLOCK=block,
            num_warps=_num_warps(block))
    return q, scale


def _num_warps(block: int) -> int:
    """About 8-16 elements a thread, 1 to 16 warps."""
    return max(1, min(16, block // 512))
