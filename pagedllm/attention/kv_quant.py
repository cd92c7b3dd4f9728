"""The KV cache's element type, and fp8 (e4m3) quantization of K/V in plain PyTorch.

An fp8 cache stores K / k_scale and V / v_scale (one scale per layer, 1.0 unless the checkpoint gives one),
clamped to +-448 before the cast: torch's cast of an out-of-range value gives NaN, not saturation. Readers
dequantize (fp8 -> float, times the scale) and accumulate in float32. A cache of the model dtype ignores the
scales. The Triton kernels do the same arithmetic (reshape_and_cache, attend_tile).
"""
import torch

from pagedllm.layers.quantization.fp8 import FP8, FP8_MAX

_NAMES = {"fp8": FP8, "fp8_e4m3": FP8}


def resolve_kv_cache_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """EngineConfig.kv_cache_dtype -> the KV cache tensors' dtype ("auto": the model dtype)."""
    if kv_cache_dtype == "auto":
        return model_dtype
    return _NAMES[kv_cache_dtype]


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype == FP8


def quantize(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x / scale as fp8: float32 times the reciprocal (as the kernel computes it), clamped, cast (round to
    nearest even)."""
    return (x.float() * (1.0 / scale)).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def dequantize(x: torch.Tensor, scale: float) -> torch.Tensor:
    """K or V read from the cache, as float32: fp8 times its scale; a model-dtype cache as it is."""
    return x.float() * scale if is_fp8(x.dtype) else x.float()


def raw(t: torch.Tensor) -> torch.Tensor:
    """fp8 tensors as uint8 for block copies (CPU torch has no index_copy_ for float8); others unchanged."""
    return t.view(torch.uint8) if is_fp8(t.dtype) else t
