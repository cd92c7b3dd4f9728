"""Qwen3: Llama plus a per-head RMSNorm (q_norm, k_norm over head_dim) on q and k before RoPE;
biases follow config.attention_bias."""
from pagedllm.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
