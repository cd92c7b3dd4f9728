"""Phi-3 (Phi-3-mini/medium, Phi-3.5-mini, Phi-4, Phi-4-mini): Llama's graph. What differs is read elsewhere:
its checkpoints store q/k/v and gate/up fused (qkv_proj, gate_up_proj), which the loader reads as their parts;
longrope and partial_rotary_factor are layers/rotary.py's; its sliding_window (Phi-3-mini-4k: 2047 of 4096) windows
every layer, as Mistral's (llama.layer_sliding_window)."""
from pagedllm.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    qkv_bias = False   # Phi-3's projections have no bias, whatever config.attention_bias says
    # one module each in the HF model: PEFT gives an adapter one lora_A for all their parts (lora/layers.py holds it
    # once; lora/peft_loader.py refuses adapters with an A a part)
    hf_fused_modules = ("qkv_proj", "gate_up_proj")
