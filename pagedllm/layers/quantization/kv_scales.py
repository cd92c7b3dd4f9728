"""KV cache scales in a checkpoint: which Attention layer's k_scale / v_scale a tensor name sets.

Names as published: `<layer>.self_attn.k_scale` / `v_scale` (compressed-tensors, vLLM), the older
`<layer>.self_attn.k_proj.output_scale` / `v_proj.output_scale`, and vLLM's one `<layer>.self_attn.kv_scale`
for both. Query and probability scales (`q_scale`, `prob_scale`: FP8 attention math) are read and dropped.
"""
_SUFFIXES = {
    ".k_scale": ("k_scale",), ".v_scale": ("v_scale",), ".kv_scale": ("k_scale", "v_scale"),
    ".k_proj.output_scale": ("k_scale",), ".v_proj.output_scale": ("v_scale",),
    ".q_scale": (), ".prob_scale": (), ".q_proj.output_scale": (),
}


def kv_scale_target(name: str) -> tuple[str, tuple[str, ...]] | None:
    """'model.layers.3.self_attn.k_scale' -> ('model.layers.3.self_attn.attn', ('k_scale',)); None if `name`
    is no attention scale."""
    for suffix, attrs in _SUFFIXES.items():
        if name.endswith(suffix) and ".self_attn" in name:
            module = name[:name.index(".self_attn") + len(".self_attn")]
            return f"{module}.attn", attrs
    return None
