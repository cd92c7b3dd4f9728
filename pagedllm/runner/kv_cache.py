"""KV cache tensors: one per layer, (2, num_blocks, block_size, num_kv_heads, head_dim), K then V."""
import logging

import torch

from pagedllm.config import EngineConfig

logger = logging.getLogger("pagedllm")

_CPU_DEFAULT_CAP = 4 << 30


def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                    dtype: torch.dtype) -> int:
    return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize


def determine_num_blocks(config: EngineConfig, max_model_len: int, block_bytes: int) -> int:
    """Explicit count, else kv_cache_memory bytes, else enough for max_num_seqs full-length requests
    (at most 4 GiB). Sizing from measured free GPU memory belongs to the GPU path."""
    if config.num_gpu_blocks_override is not None:
        return config.num_gpu_blocks_override
    if config.kv_cache_memory is not None:
        num_blocks = config.kv_cache_memory // block_bytes
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory={config.kv_cache_memory} bytes is less than one KV block "
                             f"({block_bytes} bytes)")
        return num_blocks
    blocks_per_seq = -(-max_model_len // config.block_size)
    return max(1, min(config.max_num_seqs * blocks_per_seq, _CPU_DEFAULT_CAP // block_bytes))


def allocate_kv_caches(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                       dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
