"""Rotary position embedding, HF rotate-half layout, from a table precomputed up to max_position_embeddings.

The table is built with exactly transformers' float32 arithmetic (same ops, same order), so cos/sin match
theirs bit for bit; it is cast to the activations' dtype at use, as transformers does.
partial_rotary_factor < 1 (Phi-4-mini): only the first rotary_dim = int(D * factor) features of each head rotate
(rotate-half within them); the rest pass through. The table is then (max_pos, rotary_dim).
longrope (Phi-3-128k, Phi-3.5, Phi-4-mini): transformers picks short_factor or long_factor per forward call from
the longest position in it, so a sequence that grows past original_max_position_embeddings mixes keys of both in
its cache. We take vLLM's choice instead, one set per engine: long_factor when max_model_len is above
original_max_position_embeddings (fit), else short_factor; both scaled by the same attention factor.
linear (Gemma 3's global layers on 4B and up): every frequency divided by factor.
"""
import math

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")


def rope_parameters(config, layer_type: str | None = None) -> dict:
    """rope_theta and scaling of an HF config: transformers 5 keeps both in config.rope_parameters;
    older configs have config.rope_theta and config.rope_scaling.

    Gemma 3 rotates its layer types differently: transformers 5 keeps one set per type, keyed by it
    ({"sliding_attention": ..., "full_attention": ...}); transformers 4 kept the global layers' in rope_theta /
    rope_scaling and the sliding ones' theta in rope_local_base_freq (no scaling). layer_type picks one (None:
    full_attention's, the set that decides the context: max_model_len's default)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if params and set(params) <= set(getattr(config, "layer_types", None) or ()):   # one set per layer type
        params = params[layer_type or "full_attention"]
    elif layer_type == "sliding_attention" and getattr(config, "rope_local_base_freq", None) is not None:
        params = {"rope_type": "default", "rope_theta": config.rope_local_base_freq}
    params = dict(params)
    params.setdefault("rope_theta", getattr(config, "rope_theta", None) or getattr(config, "default_theta", 10000.0))
    params.setdefault("rope_type", params.pop("type", "default"))   # "type": the pre-4.45 key
    if params["rope_type"] in ("su", "yarn") and getattr(config, "model_type", None) == "phi3":
        params["rope_type"] = "longrope"   # Phi-3's early names for it, renamed as transformers does
    params.setdefault("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0)
    if params["rope_type"] == "longrope":   # Phi-3 keeps it at the top level, where it wins (as in transformers)
        top = getattr(config, "original_max_position_embeddings", None)
        params["original_max_position_embeddings"] = top or params.get("original_max_position_embeddings") \
            or config.max_position_embeddings
        params.setdefault("max_position_embeddings", config.max_position_embeddings)
    return params


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position_embeddings: int, params: dict):
        super().__init__()
        rope_type = params["rope_type"]
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope_type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
        factor = params.get("partial_rotary_factor", 1.0)
        if not 0.0 < factor <= 1.0:
            raise ValueError(f"partial_rotary_factor must be in (0, 1], got {factor}")
        self.head_dim, self.rotary_dim = head_dim, int(head_dim * factor)
        self.params, self.max_position_embeddings = params, max_position_embeddings
        self.long = None   # longrope: whether the table is long_factor's (fit)
        self.register_buffer("cos_sin_cache", self._table(max_position_embeddings), persistent=False)

    @property
    def partial(self) -> bool:
        """Only part of each head rotates: the fused CUDA kernels rotate whole heads, so the model runs forward."""
        return self.rotary_dim != self.head_dim

    def fit(self, max_model_len: int) -> None:
        """The engine's max_model_len: longrope's table becomes long_factor's above original_max_position_embeddings,
        short_factor's within it (vLLM's choice: every position of every sequence rotates with the same set)."""
        if self.params["rope_type"] == "longrope" and self.long != self._longrope_long(max_model_len):
            self.cos_sin_cache = self._table(max_model_len).to(self.cos_sin_cache.device)

    def _table(self, max_model_len: int) -> torch.Tensor:
        dim = self.rotary_dim
        inv_freq = 1.0 / (self.params["rope_theta"] ** (torch.arange(0, dim, 2).float() / dim))
        scale = 1.0
        if self.params["rope_type"] == "linear":
            inv_freq = inv_freq / self.params["factor"]
        elif self.params["rope_type"] == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, self.params)
        elif self.params["rope_type"] == "longrope":
            self.long = self._longrope_long(max_model_len)
            inv_freq, scale = _longrope_inv_freq(dim, self.params, self.long)
        t = torch.arange(self.max_position_embeddings).float()
        freqs = t[:, None] * inv_freq[None, :]                 # (max_pos, R/2), R = rotary_dim
        # cos | sin side by side, each of half width: rotate-half repeats the same R/2 angles in both halves.
        # float32 on purpose; never cast this buffer with the model. longrope's factor scales both, as HF's.
        if scale != 1.0:
            return torch.cat((freqs.cos() * scale, freqs.sin() * scale), dim=-1)
        return torch.cat((freqs.cos(), freqs.sin()), dim=-1)

    def _longrope_long(self, max_model_len: int) -> bool:
        return max_model_len > self.params["original_max_position_embeddings"]

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """positions (T,), q (T, Hq, D), k (T, Hkv, D) -> rotated q, k."""
        cos, sin = self.cos_sin_cache[positions].chunk(2, dim=-1)   # (T, R/2) each
        cos, sin = cos[:, None].to(q.dtype), sin[:, None].to(q.dtype)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if not self.partial:
            return _rotate(x, cos, sin)
        return torch.cat((_rotate(x[..., :self.rotary_dim], cos, sin), x[..., self.rotary_dim:]), dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # HF: x * [cos, cos] + rotate_half(x) * [sin, sin], rotate_half(x) = [-x2, x1]; written per half,
    # which is the same float arithmetic (a + (-b) * s == a - b * s exactly).
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _longrope_inv_freq(dim: int, params: dict, long: bool) -> tuple[torch.Tensor, float]:
    """LongRoPE (Phi-3): each frequency divided by its short or long factor; cos and sin scaled by
    attention_factor, else sqrt(1 + ln(s) / ln(original)) with s = factor, else the context's growth."""
    for key in ("short_mscale", "long_mscale"):   # vLLM scales by these, transformers ignores them
        if params.get(key) is not None:
            raise ValueError(f"rope_parameters.{key} is not supported (transformers ignores it, vLLM applies it)")
    original = params["original_max_position_embeddings"]
    factors = params["long_factor" if long else "short_factor"]
    if len(factors) != dim // 2:
        raise ValueError(f"rope_parameters.{'long' if long else 'short'}_factor has {len(factors)} values, "
                         f"the rotary dims need {dim // 2}")
    ext = torch.tensor(factors, dtype=torch.float32)
    inv_freq = 1.0 / (ext * params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scale = params.get("attention_factor")
    if scale is None:
        growth = params.get("factor") or params["max_position_embeddings"] / original
        scale = 1.0 if growth <= 1.0 else math.sqrt(1 + math.log(growth) / math.log(original))
    return inv_freq, scale


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
