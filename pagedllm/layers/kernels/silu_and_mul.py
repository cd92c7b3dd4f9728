"""SiLU- or GeLU(tanh)-and-multiply in one launch: gate_up (T, 2I) -> act(gate) * up (T, I).

Rounds where torch does (act(gate) * up in the activations' dtype): the activation in float32, rounded; then the
product, rounded. ACT (a constexpr, so SiLU's compiled kernel is the one it was before GeGLU joined):
  silu:      g / (1 + exp(-g))
  gelu_tanh: 0.5 * g * (1 + tanh(sqrt(2/pi) * (g + 0.044715 * g^3))), F.gelu(approximate="tanh") as torch's CUDA
             code computes it: the inner sum one fma (nvcc contracts it), tanhf (libdevice's, what nvcc links).
Grid: (token, column tile), tokens on axis 0 (no 65535 limit).
"""
import math

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

BLOCK = 1024
_GELU_BETA = tl.constexpr(math.sqrt(2 / math.pi))   # torch's kBeta (M_SQRT2 * M_2_SQRTPI * 0.5) in float32


@triton.jit
def activation(gate, ACT: tl.constexpr):
    """act(gate) of a float32 gate, in float32 (not rounded)."""
    if ACT == "gelu_tanh":
        # 1 + tanh cancels for gate < ~-3 (off by up to ~2^-24 * |gate|), as torch's code does: kept, to match it
        out = 0.5 * gate * (1.0 + libdevice.tanh(tl.fma(0.044715, gate * gate * gate, gate) * _GELU_BETA))
    else:
        tl.static_assert(ACT == "silu", "ACT: silu or gelu_tanh")
        out = gate / (1.0 + tl.exp(-gate))
    return out


@triton.jit
def silu_and_mul_kernel(gate_up_ptr, out_ptr, stride_in, stride_out, n_cols, ACT: tl.constexpr,
                        BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(gate_up_ptr + row * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_in + n_cols + cols, mask=mask, other=0.0)
    act = activation(gate, ACT).to(up.dtype)
    out = act.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(gate_up: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """gate_up (..., 2I), gate first -> act(gate) * up (..., I) of the same dtype; act "silu" or "gelu_tanh"."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"silu_and_mul: last dim {gate_up.shape[-1]} must be even (gate | up)")
    n_cols = gate_up.shape[-1] // 2
    x = gate_up.reshape(-1, 2 * n_cols)
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty((x.shape[0], n_cols), dtype=x.dtype, device=x.device)
    if x.shape[0] > 0 and n_cols > 0:
        silu_and_mul_kernel[(x.shape[0], triton.cdiv(n_cols, BLOCK))](
            x, out, x.stride(0), out.stride(0), n_cols, ACT=act, BLOCK=BLOCK, num_warps=4)
    return out.view(*gate_up.shape[:-1], n_cols)
