"""--hf-overrides (vLLM's): values over the model's config.json, applied where the HF config is loaded, so all
that is read from it (the model's shapes and rope, max_model_len's default, the KV disk tier's identity) sees
them, in the engine core and the API process alike."""
from transformers import PretrainedConfig


def apply_hf_overrides(config: PretrainedConfig, raw: dict, overrides: dict) -> PretrainedConfig:
    """config: config.json (raw) as loaded. vLLM's merge: a key naming a sub-config (text_config, ...) merges
    into it key by key, at every depth; any other key's value replaces the checkpoint's whole (a rope_scaling
    object is not merged into the old one). The config is rebuilt from the merged values so transformers reads
    them as it reads config.json: rope_scaling and rope_theta become its rope_parameters, which setting the
    attribute afterwards would leave stale."""
    merged = dict(raw)
    for key, value in overrides.items():
        nested = isinstance(getattr(config, key, None), PretrainedConfig) and isinstance(value, dict)
        merged[key] = _deep_merge(merged.get(key) or {}, value) if nested else value
    # A config.json of transformers 5's form keeps the theta in rope_parameters, which wins over a top-level
    # rope_theta: the override goes where it is read (it was silently ignored). Gemma 3's holds one set per layer
    # type: the theta is the full layers', as transformers reads a top-level rope_theta (it was every layer's)
    rope = merged.get("rope_parameters")
    if "rope_theta" in overrides and isinstance(rope, dict) and "rope_parameters" not in overrides:
        theta = {"rope_theta": overrides["rope_theta"]}
        full = rope.get("full_attention")
        merged["rope_parameters"] = {**rope, "full_attention": {**full, **theta}} if isinstance(full, dict) \
            else {**rope, **theta}
    try:
        return type(config).from_dict(merged)
    except Exception as e:   # transformers 5's strict config fields raise their own errors (not ValueError)
        raise ValueError(f"--hf-overrides {overrides}: the model's config does not take it: "
                         f"{' '.join(str(e).split())[:300]}") from e


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _deep_merge(out[key], value) if both else value
    return out
