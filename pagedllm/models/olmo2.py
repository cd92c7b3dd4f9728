"""OLMo-2: Llama's attention and MLP with the norms moved after them, and q / k normed across all heads.

    h = x + post_attention_layernorm(self_attn(x))          no pre-norms: each sublayer reads the stream itself
    out = h + post_feedforward_layernorm(mlp(h))
    self_attn: q_norm over the whole q projection (Hq*D), k_norm over the whole k one (Hkv*D), then RoPE

The residual stream is `hidden` itself (residual stays None), so the fused add+norm kernels, which norm the sum,
do not fit: on CUDA each norm is the plain rms_norm launch and the add a torch add. q_norm / k_norm run before the
Llama attention path (their own rms_norm launches on CUDA), which then rotates without per-head norms
(qk_norm_rope and the decode kernel with norms off). The small-M path is Llama's layer only, so not taken here.
Tensor parallelism: q_norm / k_norm need every head, and a rank holds its own. Each rank all-gathers its q and k
(one collective a layer, (T, N * (q + k)) values), norms the whole q and k with the whole weights, as TP=1 does
(bit for bit: the same values in the same order), and keeps its heads' columns. KV heads replicated on several
ranks (Hkv < N) are gathered once each. (vLLM gathers too; an all-reduce of the sum of squares sends less but sums
in another order than TP=1.)
"""
import torch
from torch import nn

from pagedllm.distributed.layers import head_shard
from pagedllm.distributed.parallel_state import TPGroup
from pagedllm.layers.norm import RMSNorm
from pagedllm.layers.quantization.fp8_config import Fp8Config
from pagedllm.layers.rotary import RotaryEmbedding
from pagedllm.models.llama import LlamaAttention, LlamaForCausalLM, dense_mlp


class Olmo2Attention(LlamaAttention):
    def __init__(self, config, layer_idx: int, rotary_emb: RotaryEmbedding, quant: Fp8Config | None, prefix: str,
                 tp: TPGroup):
        super().__init__(config, layer_idx, rotary_emb, config.attention_bias, False, quant, prefix, tp)
        # qk_norm stays False: Llama's per-head norms are off; these norm whole projections, in attend. Their
        # weights are whole on every rank (the loader's checkpoint_slice: norms whole)
        num_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.q_norm = RMSNorm(config.num_attention_heads * self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = RMSNorm(num_kv * self.head_dim, eps=config.rms_norm_eps)
        self.tp = tp
        heads = head_shard(config.num_attention_heads, num_kv, tp)
        self.q_cols = (heads.q_start * self.head_dim, (heads.q_start + heads.num_heads) * self.head_dim)
        self.k_cols = (heads.kv_start * self.head_dim, (heads.kv_start + heads.num_kv_heads) * self.head_dim)
        self.kv_every = max(1, tp.size // num_kv)   # ranks that hold each KV head

    def attend(self, positions: torch.Tensor, qkv: torch.Tensor) -> torch.Tensor:
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)       # (T, Hq*D), (T, Hkv*D) x2
        if not self.tp.enabled:
            return super().attend(positions, torch.cat([self.q_norm(q), self.k_norm(k), v], dim=-1))
        n = q.shape[0]   # every rank's q and k in rank order, then the whole q, k (each KV head once)
        both = self.tp.all_gather_last(torch.cat([q, k], dim=-1)).view(n, self.tp.size, -1)
        q = self.q_norm(both[:, :, :self.q_size].reshape(n, -1))[:, self.q_cols[0]:self.q_cols[1]]
        k = self.k_norm(both[:, ::self.kv_every, self.q_size:].reshape(n, -1))[:, self.k_cols[0]:self.k_cols[1]]
        return super().attend(positions, torch.cat([q, k, v], dim=-1))


class Olmo2DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, rotary_emb: RotaryEmbedding, qkv_bias: bool, qk_norm: bool,
                 quant: Fp8Config | None = None, tp: TPGroup = TPGroup(), make_mlp=dense_mlp):
        super().__init__()   # qkv_bias, qk_norm: LlamaDecoderLayer's signature; OLMo-2's come from its config
        prefix = f"model.layers.{layer_idx}"
        self.self_attn = Olmo2Attention(config, layer_idx, rotary_emb, quant, f"{prefix}.self_attn", tp)
        self.mlp = make_mlp(config, layer_idx, quant, f"{prefix}.mlp", tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: None):
        """hidden (T, C): the residual stream itself; residual is None in and out."""
        hidden = hidden + self.post_attention_layernorm(self.self_attn(positions, hidden))
        return hidden + self.post_feedforward_layernorm(self.mlp(hidden)), None

    def fp8_input_producers(self) -> tuple:
        """Only SiLU-and-mul feeds an FP8 linear directly (qkv_proj and gate_up_proj read the stream)."""
        return ((self.mlp.act_fn, self.mlp.down_proj),)


class Olmo2ForCausalLM(LlamaForCausalLM):
    decoder_layer = Olmo2DecoderLayer
