"""FP8 (float8_e4m3fn) W8A8 math: weights per output channel, activations per token (or one static scale).

    y = (q_x * s_x) @ (q_w * s_w)^T + bias        q_x (M, K), s_x (M, 1); q_w (N, K), s_w (N,)

On CUDA: the per-token quant kernel, then torch._scaled_mm on FP8 tensor cores with rowwise scales, float32
accumulation, bias and the output dtype in its epilogue; the small GEMMs where that is slow (triton_serves)
run kernels/fp8_gemm.py instead (it says why).
Elsewhere, and for shapes _scaled_mm refuses, the emulated path below: the same definition in float32 (real
float8 casts), also the tests' oracle.
"""
import os

import torch

from pagedllm.lazy_kernel import lazy_kernel

per_token_quant_fp8 = lazy_kernel(globals(), "pagedllm.layers.kernels.quant_fp8", "per_token_quant_fp8")
fp8_gemm = lazy_kernel(globals(), "pagedllm.layers.kernels.fp8_gemm", "fp8_gemm")

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0          # torch.finfo(float8_e4m3fn).max; the cast of a larger value is NaN, so clamp first
# Scales are absmax * float32(1/448), a multiplication: torch divides a CUDA tensor by a Python number as a
# multiplication by its reciprocal but a CPU tensor truly, so `absmax / 448` would differ between devices by
# an ulp, and so would every value quantized with it. A float32 multiply is the same everywhere.
INV_FP8_MAX = float(torch.tensor(1 / FP8_MAX, dtype=torch.float32))
SCALE_EPS = 1e-12        # floor of a dynamic scale: an all-zero row quantizes to zeros, not NaN
_MM_ALIGN = 16           # _scaled_mm: K and N multiples of 16 (fp8 operands 16-byte aligned)
_MM_DTYPES = (torch.bfloat16, torch.float16)   # rowwise _scaled_mm outputs (float32 only through cuBLAS on sm90)
# H100 (benchmarks/fp8_gemm.py, session 50): the Triton kernel against rowwise _scaled_mm on Qwen3-0.6B's
# layers at 64-512 rows: 1.45-1.56x where the output is narrow (o, down: N 1024) or M is 64, even or slower on
# qkv / gate_up at 128+ rows, 0.6-0.85x on Llama-3.1-8B's. PAGEDLLM_FP8_TRITON_MAX_M=0: off (A/B runs).
TRITON_MAX_M = int(os.environ.get("PAGEDLLM_FP8_TRITON_MAX_M", "512"))
TRITON_MAX_WEIGHT = 1 << 24   # 16M elements: Llama-3.1-8B's smallest layer (o) is 16.8M


def triton_serves(m: int, n: int, k: int) -> bool:
    return m <= TRITON_MAX_M and n * k < TRITON_MAX_WEIGHT and (n <= 2048 or m <= 64)


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale in float32, clamped to the fp8 range, cast (round to nearest even)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (N, K) -> (q (N, K) fp8, scale (N,) float32): scale = absmax(row) * float32(1/448)."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) * INV_FP8_MAX).clamp_min(SCALE_EPS)
    return quantize(w, scale[:, None]), scale


def quantize_per_token(x: torch.Tensor, input_scale: torch.Tensor | None = None):
    """x (M, K) -> (q (M, K) fp8, scale (M, 1) float32): dynamic absmax(row) * float32(1/448), or
    the static input_scale. The torch reference of the Triton kernel (bit-exact)."""
    x32 = x.float()
    if input_scale is None:
        scale = (x32.abs().amax(dim=-1, keepdim=True) * INV_FP8_MAX).clamp_min(SCALE_EPS)
    else:
        scale = input_scale.float().reshape(1, 1).expand(x.shape[0], 1)
    return quantize(x32, scale), scale


def dequantize_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """An fp8 weight (N, K) with one multiplier per (bn, bk) block (ceil(N/bn), ceil(K/bk)) -> float32 (N, K)."""
    n, k = weight.shape
    bn, bk = block
    scales = scale_inv.float().repeat_interleave(bn, dim=0)[:n].repeat_interleave(bk, dim=1)[:, :k]
    return weight.float() * scales


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
               input_scale: torch.Tensor | None) -> torch.Tensor:
    """x (..., K) in the model dtype -> (..., N) in the model dtype."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if x.is_cuda and scaled_mm_supported(k, weight.shape[0], x.dtype):
        out = _scaled_mm_linear(x2, weight, weight_scale, bias, input_scale)
    else:
        out = fp8_linear_emulated(x2, weight, weight_scale, bias, input_scale)
    return out.view(*lead, weight.shape[0])


def scaled_mm_supported(k: int, n: int, dtype: torch.dtype) -> bool:
    """_scaled_mm needs K and N multiples of 16 and a bf16/fp16 output for rowwise scales; others (tiny test
    models: the demo model's intermediate size 172) take the emulated path, which is right but slow."""
    return k % _MM_ALIGN == 0 and n % _MM_ALIGN == 0 and dtype in _MM_DTYPES


def _scaled_mm_linear(x, weight, weight_scale, bias, input_scale):
    # Static shapes, no host sync: capturable in a CUDA graph
    q, scale = per_token_quant_fp8(x, input_scale)
    return scaled_mm(q, scale, weight, weight_scale, bias, x.dtype)


def scaled_mm(q, scale, weight, weight_scale, bias, out_dtype: torch.dtype) -> torch.Tensor:
    """Quantized rows q (M, K) with scales (M, 1) -> (M, N); also the entry of a fused norm's or activation's
    output (layers/quantization/fuse.py)."""
    # weight (N, K) row-major: its .t() is the column-major (K, N) operand _scaled_mm needs, no copy
    if triton_serves(q.shape[0], *weight.shape):
        return fp8_gemm(q, scale, weight, weight_scale, bias, out_dtype)
    return torch._scaled_mm(q, weight.t(), scale_a=scale, scale_b=weight_scale.view(1, -1), bias=bias,
                            out_dtype=out_dtype)


def fp8_linear_emulated(x, weight, weight_scale, bias, input_scale):
    """The definition in float32: x quantized-dequantized per token @ the dequantized weight^T (+ bias)."""
    q, scale = quantize_per_token(x, input_scale)
    out = (q.float() * scale) @ (weight.float() * weight_scale.float()[:, None]).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)
