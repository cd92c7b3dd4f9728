"""RMSNorm with HF's exact arithmetic and vLLM's fused-residual convention; one Triton launch on CUDA."""
import torch
from torch import nn

from pagedllm.lazy_kernel import lazy_kernel

rms_norm = lazy_kernel(globals(), "pagedllm.layers.kernels.rms_norm", "rms_norm")   # Triton, CUDA only
rms_norm_quant_fp8 = lazy_kernel(globals(), "pagedllm.layers.kernels.fused_quant_fp8", "rms_norm_quant_fp8")


class RMSNorm(nn.Module):
    unit_offset = False   # Gemma's norms scale by (1 + weight) in float32 (models/gemma.py); a flag of the kernels

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.quant_fp8 = False   # CUDA: output (fp8 rows, scales) for the next FP8 linear (quantization/fuse.py)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """x (..., hidden) -> normed x; with residual, x + residual is normed and also returned as the new residual.

        Folding the residual add into the norm lets a decoder layer pass (hidden, residual) along:
            hidden, residual = norm(hidden, residual)   # residual <- hidden + residual
        """
        if self.quant_fp8:   # set on CUDA only (quantization/fuse.py)
            return rms_norm_quant_fp8(x, self.weight, self.variance_epsilon, residual)
        if x.is_cuda:
            return rms_norm(x, self.weight, self.variance_epsilon, residual, unit_offset=self.unit_offset)
        return self.forward_native(x, residual)

    def forward_native(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """The torch code: the CPU path and the oracle of the fused kernel."""
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # Same op order as transformers' LlamaRMSNorm, so float32 outputs match bit for bit.
        input_dtype = x.dtype
        x = x.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * x.to(input_dtype)


def add_norm(norm: RMSNorm, hidden: torch.Tensor, residual: torch.Tensor | None):
    """norm(hidden + residual) and that sum, the next residual; the first layer has none: norm(hidden), hidden."""
    return (norm(hidden), hidden) if residual is None else norm(hidden, residual)
