"""y += LoRA(x) on CUDA (imported lazily: Triton): which kernels serve a layer.

  fused    one launch a layer (lora/fused.py) for ranks <= 64, the default; larger ranks take the split path
  split    two launches a layer, shrink then expand (lora/kernels.py)
  overlap  the split kernels, the shrink on a side stream while the base GEMM runs (both only read x), the expand
           after both: a decode step's LoRA launches are latency-bound (~8 us each for a few KB of work), so
           half of them hide behind the base layer's GEMM. CUDA graphs capture the fork and the join.

PAGEDLLM_LORA_KERNEL picks one for the process (benchmarks/lora_kernels.py times both on the GPU).
"""
import os

import torch

from pagedllm.lora.fused import FUSED_MAX_RANK, lora_fused
from pagedllm.lora.kernels import add_lora as add_lora_split
from pagedllm.lora.kernels import lora_expand, lora_shrink, shrink_output

KERNEL_ENV = "PAGEDLLM_LORA_KERNEL"
KERNELS = ("fused", "split", "overlap")
LORA_KERNEL = os.environ.get(KERNEL_ENV, "fused")
if LORA_KERNEL not in KERNELS:
    raise ValueError(f"{KERNEL_ENV} must be one of {KERNELS}, got {LORA_KERNEL!r}")


def add_lora(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, order: torch.Tensor,
             sorted_slots: torch.Tensor, shard_bounds: torch.Tensor, max_shard: int, rank: int) -> torch.Tensor:
    """y (T, out) += (x A[s]^T) B[s]^T for every token of slot s >= 0, in place (lora/kernels.py's contract)."""
    if LORA_KERNEL == "fused" and rank <= FUSED_MAX_RANK:
        return lora_fused(y, x, lora_a, lora_b, order, sorted_slots, shard_bounds, max_shard, rank)
    return add_lora_split(y, x, lora_a, lora_b, order, sorted_slots, shard_bounds, max_shard, rank)


def base_plus_lora(base, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, order: torch.Tensor,
                   sorted_slots: torch.Tensor, shard_bounds: torch.Tensor, max_shard: int, rank: int,
                   side: torch.cuda.Stream | None) -> torch.Tensor:
    """base(x) + LoRA(x) for the tokens with a slot. With the overlap kernel, t = x A^T runs on `side` beside
    base(x); t is allocated on the current stream, which waits for `side` before the expand reads t, and `side`
    waits for the current stream before it reads x, so every buffer's use stays ordered (eager or captured)."""
    if LORA_KERNEL != "overlap" or side is None:   # (side: None on CPU, the interpreter tests)
        return add_lora(base(x), x, lora_a, lora_b, order, sorted_slots, shard_bounds, max_shard, rank)
    main = torch.cuda.current_stream(x.device)
    t = shrink_output(x, lora_a)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        lora_shrink(x, lora_a, order, sorted_slots, out=t)
    y = base(x)
    main.wait_stream(side)
    return lora_expand(y, t, lora_b, order, sorted_slots, shard_bounds, max_shard, rank)
