"""SiLU-and-multiply over a fused gate_up projection."""
import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up (T, 2 * I), gate first -> silu(gate) * up (T, I)."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
