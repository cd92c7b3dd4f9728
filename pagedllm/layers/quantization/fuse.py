"""Hand each FP8 linear's per-token quantization to the op before it (RMSNorm, SiLU- or GeGLU-and-mul), on CUDA.

Fused, the op writes fp8 rows and their scales instead of a model-dtype output that the quant kernel then reads
again (kernels/fused_quant_fp8.py; the same bytes as the unfused pair). Only where the consumer runs on
_scaled_mm with dynamic scales: static input scales and emulated shapes keep the unfused path.
PAGEDLLM_FP8_FUSED=0 turns it off (A/B runs).
"""
import os

from torch import nn

from pagedllm.layers.quantization.fp8 import scaled_mm_supported
from pagedllm.layers.quantization.fp8_linear import Fp8Linear

ENABLED = os.environ.get("PAGEDLLM_FP8_FUSED", "1") != "0"
MAX_FUSED_COLS = 32768   # the fused kernels hold a row in registers: a longer one would spill


def fuse_fp8_inputs(model: nn.Module, on_cpu: bool = False) -> int:
    """Flag the producers of every fusable FP8 linear's input in a decoder; returns how many were flagged.
    on_cpu: also a CPU model (tests of the plumbing, with torch stand-ins for the kernels)."""
    if not ENABLED:
        return 0
    fused = 0
    for layer in model.model.layers:
        for producer, linear in layer.fp8_input_producers():
            if (isinstance(linear, Fp8Linear) and (linear.weight.is_cuda or on_cpu) and linear.input_scale is None
                    and scaled_mm_supported(linear.in_features, linear.out_features, linear.out_dtype)
                    and linear.in_features <= MAX_FUSED_COLS):
                producer.quant_fp8 = True
                fused += 1
    return fused
