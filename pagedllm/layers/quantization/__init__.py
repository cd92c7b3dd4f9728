"""Quantized linear layers (FP8 W8A8). The KV cache's FP8 dtype lives with the KV cache and attention kernels;
the checkpoint's KV scales are read here (kv_scales.py) into each Attention layer's k_scale / v_scale."""
