"""Granite (IBM Granite 3.x): Llama with four scalars from its config, set on Llama's modules:
    embedding_multiplier   the token embeddings times it
    residual_multiplier    each sublayer's (attention's, MLP's) output times it before the residual add
    attention_multiplier   the softmax scale, in place of head_dim ** -0.5 (every attention backend takes
                           Attention.scale: the CPU torch path, the Triton kernels, cuDNN / FA4 prefill)
    logits_scaling         the logits divided by it (here on the float32 logits)
"""
from pagedllm.distributed.parallel_state import TPGroup
from pagedllm.layers.quantization.fp8_config import Fp8Config
from pagedllm.models.llama import LlamaForCausalLM


class GraniteForCausalLM(LlamaForCausalLM):
    def __init__(self, config, quant: Fp8Config | None = None, tp: TPGroup = TPGroup()):
        super().__init__(config, quant, tp)
        self.model.embedding_multiplier = float(config.embedding_multiplier)
        for layer in self.model.layers:
            layer.residual_multiplier = float(config.residual_multiplier)
            layer.self_attn.attn.scale = float(config.attention_multiplier)
        self.logits_scaling = float(config.logits_scaling)
