"""The fused small-M linear kernel (pagedllm/layers/kernels/small_m_linear.py) against the unfused torch code it
replaces (RMSNorm.forward_native, F.linear, SiluAndMul.forward_native), on fresh random inputs.

Shared by the GPU tests and the Triton-interpreter run on CPU (`python tests/kernels/small_m_cases.py` with
TRITON_INTERPRET=1; float32 only there: the interpreter's bf16 arithmetic is not the GPU's).
Oracle: the torch code in float32 on float32 copies; a half dtype may be off by no more than the torch code run
in that dtype is (x 1.5, + 1e-5); float32 within 1e-5 (another summation order than the oracle's GEMM).
"""
import torch
import torch.nn.functional as F
from kernel_checks import rel_error

from pagedllm.layers.activation import SiluAndMul
from pagedllm.layers.kernels.small_m_linear import small_m_linear
from pagedllm.layers.norm import RMSNorm

MODES = ("plain", "norm", "norm+residual", "norm+silu", "norm+residual+silu")


def torch_path(x, weight, norm, residual, silu):
    """The unfused layers in x's dtype -> (out, new residual or None)."""
    new_res = None
    if norm is not None:
        if residual is not None:
            x, new_res = norm.forward_native(x, residual)
        else:
            x = norm.forward_native(x)
    out = F.linear(x, weight)
    return (SiluAndMul().forward_native(out) if silu else out), new_res


def check(mode: str, m: int, k: int, n: int, dtype: torch.dtype, device: str, seed: int = 0,
          tile=(32, 128, 4, 3)) -> float:
    g = torch.Generator().manual_seed(seed)
    silu, with_norm, with_res = "silu" in mode, "norm" in mode, "residual" in mode
    x = torch.randn(m, k, generator=g)
    res = torch.randn(m, k, generator=g) if with_res else None
    weight = torch.randn(2 * n if silu else n, k, generator=g) / k ** 0.5
    norm = RMSNorm(k, eps=1e-6)
    norm.weight.data = torch.rand(k, generator=g) + 0.5
    ref, ref_res = torch_path(x, weight, norm if with_norm else None, res, silu)

    def cast(t):
        return None if t is None else t.to(device=device, dtype=dtype)
    norm_d = RMSNorm(k, eps=1e-6).to(device=device, dtype=dtype)
    norm_d.weight.data = cast(norm.weight.data)
    half, half_res = torch_path(cast(x), cast(weight), norm_d if with_norm else None, cast(res), silu)
    got = small_m_linear(cast(x), cast(weight), norm_d.weight if with_norm else None, 1e-6, cast(res), silu=silu,
                         tile=tile)
    out, out_res = got if with_res else (got, None)
    assert out.shape == ref.shape and out.dtype == dtype, f"{mode}: {out.shape} {out.dtype}"
    assert torch.isfinite(out).all(), f"{mode}: non-finite output"
    err = rel_error(out.cpu(), ref)
    limit = 1e-5 if dtype == torch.float32 else 1.5 * rel_error(half.cpu(), ref) + 1e-5
    assert err <= limit, f"{mode} m={m} k={k} n={n} {dtype}: relative error {err:.2e} > {limit:.2e}"
    if with_res:   # the new residual is x + residual rounded once, exactly as the torch code's
        assert torch.equal(out_res.cpu(), half_res.cpu()), f"{mode}: residual differs"
    return err


def interpreter_cases():
    for mode in MODES:
        for m, k, n in [(1, 96, 40), (5, 200, 64), (16, 64, 33)]:
            yield mode, m, k, n


if __name__ == "__main__":
    for mode, m, k, n in interpreter_cases():
        check(mode, m, k, n, torch.float32, "cpu", tile=(16, 64, 4, 2))
        print("ok", mode, m, k, n)
