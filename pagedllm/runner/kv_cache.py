"""KV cache tensors: one per layer, (2, num_blocks, block_size, num_kv_heads, head_dim), K then V."""
import logging

import torch

from pagedllm.config import EngineConfig, host_memory_gib
from pagedllm.core.block_pool import cdiv

logger = logging.getLogger("pagedllm")

_CPU_DEFAULT_CAP = 4 << 30
# A GPU cache holds at most this many times what max_num_seqs requests of max_model_len tokens can use: more
# would only keep more freed blocks for prefix hits, and a small model on a large GPU would otherwise get millions
# of blocks (a 2-layer test model on an H200 at 0.9: ~15M), whose host block pool takes a minute and GBs to build.
# Never binding on the benchmarks' models (Qwen3-0.6B on an H200, max_model_len 4096: ~70k blocks, cap 524k).
GPU_CAP_FACTOR = 4


def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                    dtype: torch.dtype) -> int:
    return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize


def determine_num_blocks(config: EngineConfig, max_model_len: int, block_bytes: int,
                         profiled_free_bytes: int | None = None) -> int:
    """Explicit count, else kv_cache_memory bytes, else (GPU) what memory profiling left free under
    gpu_memory_utilization, at most GPU_CAP_FACTOR x what max_num_seqs full-length requests use, else (CPU)
    enough for max_num_seqs full-length requests (at most 4 GiB)."""
    if config.num_gpu_blocks_override is not None:
        return config.num_gpu_blocks_override
    full_length = config.max_num_seqs * cdiv(max_model_len, config.block_size)   # blocks of max_num_seqs requests
    if config.kv_cache_memory is not None:
        num_blocks = config.kv_cache_memory // block_bytes
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory={config.kv_cache_memory} bytes is less than one KV block "
                             f"({block_bytes} bytes)")
        _check_one_request_fits(num_blocks, config.block_size, max_model_len, f"kv_cache_memory="
                                f"{config.kv_cache_memory} bytes", "raise kv_cache_memory")
        return num_blocks
    if profiled_free_bytes is not None:
        num_blocks = profiled_free_bytes // block_bytes
        if num_blocks * config.block_size < max_model_len:
            raise ValueError(f"gpu_memory_utilization={config.gpu_memory_utilization} leaves "
                             f"{max(profiled_free_bytes, 0) / 2**30:.2f} GiB for the KV cache, less than one "
                             f"request of max_model_len={max_model_len} tokens needs: raise "
                             f"gpu_memory_utilization or lower max_model_len")
        cap = GPU_CAP_FACTOR * full_length
        if num_blocks > cap:
            logger.info("KV cache: %d blocks fit under gpu_memory_utilization=%g; %d kept (%dx what max_num_seqs=%d "
                        "requests of max_model_len=%d use)", num_blocks, config.gpu_memory_utilization, cap,
                        GPU_CAP_FACTOR, config.max_num_seqs, max_model_len)
        return min(num_blocks, cap)
    num_blocks = max(1, min(full_length, _CPU_DEFAULT_CAP // block_bytes))
    _check_one_request_fits(num_blocks, config.block_size, max_model_len, "the CPU KV cache (at most 4 GiB unless "
                            "kv_cache_memory is set)", "set kv_cache_memory")
    return num_blocks


def _check_one_request_fits(num_blocks: int, block_size: int, max_model_len: int, what: str, or_else: str):
    """As vLLM at start-up: a cache that cannot hold one max_model_len request is an error naming the settings,
    not an engine that starts and then refuses every longer request."""
    if num_blocks * block_size < max_model_len:
        raise ValueError(f"{what} holds {num_blocks * block_size} tokens, less than one request of "
                         f"max_model_len={max_model_len} needs: lower max_model_len (to at most "
                         f"{num_blocks * block_size}) or {or_else}")


def check_asked_size_fits(config: EngineConfig, num_blocks: int, block_bytes: int, device: torch.device) -> None:
    """num_gpu_blocks_override and kv_cache_memory set the cache's size where no profiling checked it: past the
    device's free memory (the machine's physical memory on CPU), an error naming the setting, not the
    allocator's words (or, on CPU, the OOM killer)."""
    if config.num_gpu_blocks_override is None and config.kv_cache_memory is None:
        return
    need = num_blocks * block_bytes
    if device.type == "cuda":
        room, where = torch.cuda.mem_get_info(device)[0], f"free on {device}"
    else:
        memory = host_memory_gib()
        if memory is None:
            return
        room, where = memory * 2**30, "this machine's memory"
    if need > room:
        name = "num_gpu_blocks_override" if config.num_gpu_blocks_override is not None else "kv_cache_memory"
        raise ValueError(f"{name}={getattr(config, name)}: {num_blocks} KV blocks of {block_bytes} bytes need "
                         f"{need / 2**30:.1f} GiB, more than the {room / 2**30:.1f} GiB {where}")


def allocate_kv_caches(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                       dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
