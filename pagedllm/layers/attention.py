"""The attention layer: store this step's K/V in the paged cache, then attend through it.

A layer may attend within a sliding window (the query at position p sees keys p - sliding_window < t <= p) and
soft-cap its scores (logits_soft_cap * tanh(s / logits_soft_cap)); both reach the backend as the keyword arguments
sliding_window and soft_cap, passed only when set, so a plain layer's calls are those of a backend without them.
"""
import torch
from torch import nn

from pagedllm.attention import get_attention_backend
from pagedllm.attention.metadata import get_forward_context


class Attention(nn.Module):
    def __init__(self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None, logits_soft_cap: float | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window = sliding_window   # read by gemma2.py (it rebuilds the layer) and the runner (_kv_window)
        # the backend's keyword arguments for them, those set (built once: read every call)
        self.masking = {name: value for name, value in (("sliding_window", sliding_window),
                                                        ("soft_cap", logits_soft_cap)) if value is not None}
        # An fp8 KV cache stores K / k_scale and V / v_scale: 1.0 unless the checkpoint gives scales
        self.k_scale, self.v_scale = 1.0, 1.0
        self.backend = None   # picked on first call, from the device the KV cache lives on

    def kv_target(self) -> dict:
        """Where this step's K/V go (the cache, each token's slot, the scales), for a kernel that writes them
        itself (qk_norm_rope): then forward gets k = v = None."""
        ctx = get_forward_context()
        return dict(kv_cache=ctx.kv_caches[self.layer_idx], slot_mapping=ctx.attn_metadata.slot_mapping,
                    k_scale=self.k_scale, v_scale=self.v_scale)

    def takes_qkv(self) -> bool:
        """Whether forward_qkv serves this step (the Triton backend's decode-only steps: triton_backend.takes_qkv)."""
        ctx = get_forward_context()
        backend = self._backend(ctx.kv_caches[self.layer_idx])
        return hasattr(backend, "takes_qkv") and backend.takes_qkv(ctx.attn_metadata, self.head_dim)

    def forward_qkv(self, qkv: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                    q_norm: tuple[torch.Tensor, float] | None, k_norm: tuple[torch.Tensor, float] | None,
                    unit_offset: bool = False):
        """qkv (T, (Hq + 2*Hkv) * D) -> (T, Hq*D): qk_norm_rope, the K/V store and attention in the decode kernel.
        unit_offset: the norms are Gemma's (passed on only when set, as the masking)."""
        ctx = get_forward_context()
        gemma = {"unit_offset": True} if unit_offset else {}
        out = self._backend(ctx.kv_caches[self.layer_idx]).decode_qkv(
            qkv, positions, cos_sin_cache, self.num_heads, q_norm, k_norm, ctx.kv_caches[self.layer_idx],
            ctx.attn_metadata, self.scale, k_scale=self.k_scale, v_scale=self.v_scale, **self.masking, **gemma)
        return out.view(qkv.shape[0], self.num_heads * self.head_dim)

    def _backend(self, kv_cache: torch.Tensor):
        if self.backend is None:
            self.backend = get_attention_backend(kv_cache.device)
        return self.backend

    def forward(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None) -> torch.Tensor:
        """q (T, Hq*D), k and v (T, Hkv*D), already rotated -> (T, Hq*D). k = v = None: already in the cache."""
        ctx = get_forward_context()
        kv_cache = ctx.kv_caches[self.layer_idx]
        meta = ctx.attn_metadata
        self._backend(kv_cache)
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        if k is not None:
            k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
            v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
            # the scales matter only to an fp8 cache (a model-dtype cache ignores them)
            self.backend.write_kv(kv_cache, k, v, meta.slot_mapping, k_scale=self.k_scale, v_scale=self.v_scale)
        out = self.backend.paged_attention(q, kv_cache, meta, self.scale, k_scale=self.k_scale,
                                           v_scale=self.v_scale, **self.masking)
        return out.reshape(num_tokens, self.num_heads * self.head_dim)
