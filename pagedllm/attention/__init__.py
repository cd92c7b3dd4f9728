"""Attention backends: modules with write_kv(kv_cache, k, v, slot_mapping) and
paged_attention(q, kv_cache, meta, scale); chosen by the device the KV cache lives on."""
from types import ModuleType

import torch


def get_attention_backend(device: torch.device) -> ModuleType:
    # A Triton backend with the same two functions takes CUDA once it exists; torch serves everything now.
    from pagedllm.attention import torch_backend
    return torch_backend
