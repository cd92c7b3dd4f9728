"""SiLU- and GeLU(tanh)-and-multiply over a fused gate_up projection; one Triton launch on CUDA."""
import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.lazy_kernel import lazy_kernel

silu_and_mul = lazy_kernel(globals(), "pagedllm.layers.kernels.silu_and_mul", "silu_and_mul")   # Triton, CUDA only
silu_and_mul_quant_fp8 = lazy_kernel(globals(), "pagedllm.layers.kernels.fused_quant_fp8", "silu_and_mul_quant_fp8")


class SiluAndMul(nn.Module):
    act = "silu"        # the kernels' ACT
    quant_fp8 = False   # CUDA: output (fp8 rows, scales) for the next FP8 linear (quantization/fuse.py)

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up (T, 2 * I), gate first -> act(gate) * up (T, I)."""
        if self.quant_fp8:   # set on CUDA only (quantization/fuse.py)
            return silu_and_mul_quant_fp8(gate_up, self.act)
        if gate_up.is_cuda:
            return silu_and_mul(gate_up, self.act)
        return self.forward_native(gate_up)

    def forward_native(self, gate_up: torch.Tensor) -> torch.Tensor:
        """The torch code: the CPU path and the oracle of the fused kernel."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class GeluTanhAndMul(SiluAndMul):
    """Gemma's GeGLU: gelu(gate, tanh approximation) * up; on CUDA the same kernels with their gelu_tanh ACT."""
    act = "gelu_tanh"

    def forward_native(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up
