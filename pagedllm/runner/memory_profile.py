"""GPU memory profiling: what gpu_memory_utilization leaves for the KV cache after the weights and the
largest step the scheduler can send (max_num_batched_tokens tokens, max_num_seqs rows sampled)."""
import logging
from collections.abc import Callable

import torch

logger = logging.getLogger("pagedllm")


def profile_free_kv_bytes(run_largest_step: Callable[[], int], gpu_memory_utilization: float,
                          device: torch.device, copy_scratch_bytes: int = 0) -> int:
    """run_largest_step() runs one step on a throwaway KV cache and returns that cache's bytes.

    budget = total * utilization - peak bytes PyTorch held (weights + activations) - memory outside
    PyTorch (CUDA context, library workspaces, other processes) - copy_scratch_bytes: the bound on what the
    KV tier copies hold (runner/kv_offload.py). They run before the forward, but on the copy stream, whose
    cached memory the forward's allocations cannot reuse, so it adds to the step's peak."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    scratch_kv_bytes = run_largest_step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - scratch_kv_bytes
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    non_torch = total - free - torch.cuda.memory_reserved(device)
    budget = int(total * gpu_memory_utilization - peak - non_torch - copy_scratch_bytes)
    logger.info("memory profile: %.2f GiB total, %.2f GiB peak in PyTorch (weights + largest step), %.2f GiB "
                "outside PyTorch, %.3f GiB KV tier copy scratch -> %.2f GiB for the KV cache at "
                "gpu_memory_utilization %.2f", total / 2**30, peak / 2**30, non_torch / 2**30,
                copy_scratch_bytes / 2**30, budget / 2**30, gpu_memory_utilization)
    return budget
