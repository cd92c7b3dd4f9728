"""SiLU-and-multiply in one launch: gate_up (T, 2I) -> silu(gate) * up (T, I).

Rounds where torch does (F.silu(gate) * up in the activations' dtype): silu(g) = g / (1 + exp(-g)) in
float32, rounded; then the product, rounded. Grid: (token, column tile), tokens on axis 0 (no 65535 limit).
"""
import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def silu_and_mul_kernel(gate_up_ptr, out_ptr, stride_in, stride_out, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(gate_up_ptr + row * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_in + n_cols + cols, mask=mask, other=0.0)
    silu = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)
    out = silu.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up (..., 2I), gate first -> (..., I) of the same dtype."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"silu_and_mul: last dim {gate_up.shape[-1]} must be even (gate | up)")
    n_cols = gate_up.shape[-1] // 2
    x = gate_up.reshape(-1, 2 * n_cols)
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty((x.shape[0], n_cols), dtype=x.dtype, device=x.device)
    if x.shape[0] > 0 and n_cols > 0:
        silu_and_mul_kernel[(x.shape[0], triton.cdiv(n_cols, BLOCK))](
            x, out, x.stride(0), out.stride(0), n_cols, BLOCK=BLOCK, num_warps=4)
    return out.view(*gate_up.shape[:-1], n_cols)
