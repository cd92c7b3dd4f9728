"""Qwen2: Llama with a bias on q/k/v (always, whatever config.attention_bias says) and none on o_proj."""
from pagedllm.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True
