"""Rotary position embedding, HF rotate-half layout, from a table precomputed up to max_position_embeddings.

The table is built with exactly transformers' float32 arithmetic (same ops, same order), so cos/sin match
theirs bit for bit; it is cast to the activations' dtype at use, as transformers does.
"""
import math

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "llama3")


def rope_parameters(config) -> dict:
    """rope_theta and scaling of an HF config: transformers 5 keeps both in config.rope_parameters;
    older configs have config.rope_theta and config.rope_scaling."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", None) or getattr(config, "default_theta", 10000.0))
    params.setdefault("rope_type", params.pop("type", "default"))   # "type": the pre-4.45 key
    return params


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position_embeddings: int, params: dict):
        super().__init__()
        rope_type = params["rope_type"]
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope_type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
        inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
        if rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, params)
        t = torch.arange(max_position_embeddings).float()
        freqs = t[:, None] * inv_freq[None, :]                 # (max_pos, D/2)
        # cos | sin side by side, each of half width: rotate-half repeats the same D/2 angles in both halves.
        # float32 on purpose; never cast this buffer with the model.
        self.register_buffer("cos_sin_cache", torch.cat((freqs.cos(), freqs.sin()), dim=-1), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """positions (T,), q (T, Hq, D), k (T, Hkv, D) -> rotated q, k."""
        cos, sin = self.cos_sin_cache[positions].chunk(2, dim=-1)   # (T, D/2) each
        cos, sin = cos[:, None].to(q.dtype), sin[:, None].to(q.dtype)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # HF: x * [cos, cos] + rotate_half(x) * [sin, sin], rotate_half(x) = [-x2, x1]; written per half,
    # which is the same float arithmetic (a + (-b) * s == a - b * s exactly).
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths divided by factor, short kept, a smooth blend between."""
    factor = params["factor"]
    low_freq_factor, high_freq_factor = params["low_freq_factor"], params["high_freq_factor"]
    old_context_len = params["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)
