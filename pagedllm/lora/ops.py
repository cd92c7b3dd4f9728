"""y += LoRA(x) on CUDA (imported lazily: Triton): which kernels serve a layer.

  fused  one launch a layer (lora/fused.py) for ranks <= 64; larger ranks take the split path
  split  two launches a layer, shrink then expand (lora/kernels.py)
  wide   the layer's own GEMM gives x A^T, then the expand alone (LoRALinear._forward_wide; not through here)

PAGEDLLM_LORA_KERNEL picks one for the process; the default, auto, takes wide where the slots' A rows are few
beside the layer's and fused elsewhere (lora/layers.py; benchmarks/lora_kernels.py times them on the GPU).
"""
import torch

from pagedllm.lora import layers
from pagedllm.lora.fused import FUSED_MAX_RANK, lora_fused
from pagedllm.lora.kernels import add_lora as add_lora_split


def add_lora(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, order: torch.Tensor,
             sorted_slots: torch.Tensor, shard_bounds: torch.Tensor, max_shard: int, rank: int) -> torch.Tensor:
    """y (T, out) += (x A[s]^T) B[s]^T for every token of slot s >= 0, in place (lora/kernels.py's contract)."""
    if layers.LORA_KERNEL != "split" and rank <= FUSED_MAX_RANK:
        return lora_fused(y, x, lora_a, lora_b, order, sorted_slots, shard_bounds, max_shard, rank)
    return add_lora_split(y, x, lora_a, lora_b, order, sorted_slots, shard_bounds, max_shard, rank)
