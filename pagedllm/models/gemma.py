"""Gemma (1): Llama with GeGLU (gelu_pytorch_tanh), RMSNorm scaled by (1 + weight) in float32, the embeddings
times sqrt(hidden_size) rounded to the model dtype (as transformers does), and a tied LM head.

Gemma 2 is this model with two more norms a layer and windowed, soft-capped attention (gemma2.py); not Gemma 3.
On CUDA the norms are the rms_norm kernel with its unit_offset flag (Gemma's arithmetic: the normed row times
(1 + weight) in float32, rounded once; a (1 + weight) folded into a bf16 weight would lose the weight's low bits).
GeGLU is the silu_and_mul kernels with their gelu_tanh ACT, so the FP8 input fusion (quantization/fuse.py) hands
down_proj's quantization to it; not the norms' (the fused kernel computes Llama's norm), nor the small-M path
(small_m.plain refuses other norms and activations). Tensor parallelism, FP8 linears and LoRA go through Llama's
shared linears unchanged.
"""
import torch

from pagedllm.distributed.parallel_state import TPGroup
from pagedllm.layers.activation import GeluTanhAndMul
from pagedllm.layers.norm import RMSNorm
from pagedllm.layers.quantization.fp8_config import Fp8Config
from pagedllm.models.llama import LlamaDecoderLayer, LlamaForCausalLM


class GemmaRMSNorm(RMSNorm):
    unit_offset = True   # RMSNorm.forward: the rms_norm kernel's Gemma arithmetic on CUDA; _norm below on CPU

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)


class GemmaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp.act_fn = GeluTanhAndMul()

    def fp8_input_producers(self) -> tuple:
        return ((self.mlp.act_fn, self.mlp.down_proj),)   # not the norms: rms_norm_quant_fp8 computes Llama's


class GemmaForCausalLM(LlamaForCausalLM):
    decoder_layer = GemmaDecoderLayer
    hidden_act = "gelu_pytorch_tanh"   # transformers' GemmaConfig reads a legacy "gelu" as this

    def __init__(self, config, quant: Fp8Config | None = None, tp: TPGroup = TPGroup()):
        super().__init__(config, quant, tp)
        self.model.norm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # built under the model dtype (loader._build): sqrt(hidden_size) rounded to it, as transformers does
        self.model.embedding_multiplier = torch.tensor(config.hidden_size ** 0.5).item()

