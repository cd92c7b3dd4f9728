"""Gemma 3 (text): Gemma 2's layer (four (1 + weight) norms, GeGLU, query_pre_attn_scalar, scaled embeddings, tied
head, optional soft caps) with a (1 + weight) RMSNorm over each head of q and k before RoPE, and a RoPE of each
layer type's own: config.layer_types (5 sliding : 1 full on the Hub checkpoints) picks the layer's window and its
rope_parameters (sliding: theta 10k; full: theta 1M, linear scaling by 8 on 4B and up; layers/rotary.py reads
transformers 5's per-type sets and transformers 4's rope_local_base_freq).

    q, k = rope_t(q_norm(q_proj(x)), positions), rope_t(k_norm(k_proj(x)), positions)   t = config.layer_types[i]

On CUDA q_norm / k_norm are normed and rotated by the fused kernels (qk_norm_rope, and the decode kernel that takes
qkv) with their unit_offset flag (LlamaAttention.unit_offset): Gemma's arithmetic, as the other norms (gemma.py).

Gemma3ForConditionalGeneration (gemma-3-4b/12b/27b-it) is served as this text model: its config's text_config
(models.served_config), its language model's tensors, its vision tower and projector left unread. Images are
refused at the API (content_parts.py), as for every model here.
"""
from pagedllm.distributed.parallel_state import TPGroup
from pagedllm.layers.quantization.fp8_config import Fp8Config
from pagedllm.layers.rotary import RotaryEmbedding, rope_parameters
from pagedllm.models.gemma import GemmaRMSNorm
from pagedllm.models.gemma2 import Gemma2DecoderLayer, Gemma2ForCausalLM
from pagedllm.models.llama import head_dim


class Gemma3DecoderLayer(Gemma2DecoderLayer):
    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        attn = self.self_attn
        attn.qk_norm = True
        attn.q_norm = GemmaRMSNorm(attn.head_dim, eps=config.rms_norm_eps)
        attn.k_norm = GemmaRMSNorm(attn.head_dim, eps=config.rms_norm_eps)


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    decoder_layer = Gemma3DecoderLayer

    def __init__(self, config, quant: Fp8Config | None = None, tp: TPGroup = TPGroup()):
        super().__init__(config, quant, tp)
        # the model's table is full_attention's (rope_parameters' default); the sliding layers share their own
        self.model.rotary_emb_local = RotaryEmbedding(head_dim(config), config.max_position_embeddings,
                                                      rope_parameters(config, "sliding_attention"))
        for layer, layer_type in zip(self.model.layers, config.layer_types):
            if layer_type == "sliding_attention":
                layer.self_attn.rotary_emb = self.model.rotary_emb_local


class Gemma3ForConditionalGeneration(Gemma3ForCausalLM):
    """The text part of a vision-language checkpoint. Its language model is named language_model.model.* in the
    files (the Hub's, and what transformers 5 saves) and model.language_model.* in transformers 5's modules (so in
    files some tools save from them)."""
    reads_text_config = True
    weight_renames = ((r"^language_model\.model\.", "model."), (r"^model\.language_model\.", "model."),
                      (r"^language_model\.lm_head\.", "lm_head."))
    skipped_weights = (r"(model\.)?vision_tower\.", r"(model\.)?multi_modal_projector\.")
