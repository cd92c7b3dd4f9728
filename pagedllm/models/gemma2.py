"""Gemma 2: Gemma's layer (GeGLU, (1 + weight) norms, scaled embeddings, tied head) with four norms a layer,
alternating sliding-window and full attention, and soft-capped attention scores and logits.

    h = x + post_attention_layernorm(self_attn(input_layernorm(x)))
    out = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))
    self_attn: scale query_pre_attn_scalar ** -0.5 (not head_dim's), scores attn_logit_softcapping * tanh(s / cap),
               within config.sliding_window on the layers config.layer_types calls sliding (llama.layer_sliding_window)
    logits = final_logit_softcapping * tanh(logits / cap), before sampling and logprobs (compute_logits)

The residual stream rides along un-normed as in Llama's layer: input_layernorm and pre_feedforward_layernorm add
the previous sublayer's (post-normed) output to it. Features as Gemma 1's (gemma.py): on CUDA the norms are the
rms_norm kernel with Gemma's arithmetic, GeGLU the silu_and_mul kernels' (FP8 input fusion: GeGLU's only); the
small-M path is not taken; tensor parallelism (the caps and the window are per head; the final cap applies to the
gathered logits), FP8 linears and LoRA go through Llama's shared linears.
"""
import torch

from pagedllm.distributed.parallel_state import TPGroup
from pagedllm.layers.attention import Attention
from pagedllm.layers.norm import add_norm
from pagedllm.layers.quantization.fp8_config import Fp8Config
from pagedllm.models.gemma import GemmaDecoderLayer, GemmaForCausalLM, GemmaRMSNorm


class Gemma2DecoderLayer(GemmaDecoderLayer):
    def __init__(self, config, layer_idx: int, *args, **kwargs):
        super().__init__(config, layer_idx, *args, **kwargs)
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        attn = self.self_attn   # its window is Llama's (layer_sliding_window); the scale and the cap are Gemma 2's
        attn.attn = Attention(layer_idx, attn.num_heads, attn.num_kv_heads, attn.head_dim,
                              config.query_pre_attn_scalar ** -0.5, sliding_window=attn.attn.sliding_window,
                              logits_soft_cap=config.attn_logit_softcapping)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None):
        hidden, residual = add_norm(self.input_layernorm, hidden, residual)
        hidden = self.post_attention_layernorm(self.self_attn(positions, hidden))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class Gemma2ForCausalLM(GemmaForCausalLM):
    decoder_layer = Gemma2DecoderLayer

    def __init__(self, config, quant: Fp8Config | None = None, tp: TPGroup = TPGroup()):
        act = getattr(config, "hidden_activation", None) or self.hidden_act   # the MLP's, in Gemma 2's configs
        if act != self.hidden_act:
            raise NotImplementedError(f"hidden_activation {act!r} not supported (only {self.hidden_act!r})")
        if getattr(config, "use_bidirectional_attention", False):
            raise NotImplementedError("use_bidirectional_attention: only causal attention is supported")
        super().__init__(config, quant, tp)
        self.final_logit_soft_cap = config.final_logit_softcapping

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden_states)
        cap = self.final_logit_soft_cap
        return logits if cap is None else torch.tanh(logits / cap) * cap
