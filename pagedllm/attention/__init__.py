"""Attention backends: modules with write_kv(kv_cache, k, v, slot_mapping, k_scale, v_scale) and
paged_attention(q, kv_cache, meta, scale, k_scale, v_scale, sliding_window=None, soft_cap=None) (layers/attention.py
passes the last two only when set); chosen by the device the KV cache lives on.
The cache's dtype (the model's, or fp8 with per-layer scales: kv_quant.py) is the tensor's own."""
from types import ModuleType

import torch


def get_attention_backend(device: torch.device) -> ModuleType:
    """Triton kernels on CUDA; plain PyTorch (the reference) everywhere else."""
    if torch.device(device).type == "cuda":
        from pagedllm.attention import triton_backend
        return triton_backend
    from pagedllm.attention import torch_backend
    return torch_backend
