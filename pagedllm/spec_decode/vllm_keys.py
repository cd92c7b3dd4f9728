"""vLLM 0.26's --speculative-config keys that SpeculativeConfig does not keep, and its spellings of the method.

Each such key is taken where its value asks for what this engine runs anyway (its default, mostly), and refused
naming it and why otherwise: never dropped. vLLM's methods that are not built are refused saying why."""

# vLLM's method names (config/speculative.py's SpeculativeMethod) not built here -> why
METHODS_NOT_BUILT = {
    **dict.fromkeys(("eagle", "eagle3", "dflash", "extract_hidden_states"),
                    "EAGLE-style heads read the target's hidden states, which the model runner does not hand out"),
    **dict.fromkeys(("mtp", "dspark"), "multi-token-prediction layers of the target's checkpoint are not loaded"),
    "medusa": "Medusa heads are not built", "mlp_speculator": "MLP speculators are not built",
    "suffix": "suffix decoding (arctic-inference) is not built", "ngram_gpu": "the GPU n-gram proposer is not "
    "built: method ngram proposes the same tokens on the host", "custom_class": "custom proposer classes are not built",
}

# key -> (the values that ask for what runs here, why another is refused)
NEUTRAL = {
    "tensor_parallel_size": ((None,), "vLLM's spelling is draft_tensor_parallel_size (vLLM refuses this key too)"),
    "disable_padded_drafter_batch": ((False, True), ""),   # vLLM: only EAGLE's drafter pads; either runs the same
    "max_model_len": ((None,), "a draft max_model_len below the target's (skipping speculation past it) is not "
                                "built: the draft runs to the target's max_model_len"),
    "revision": ((None,), "the draft model is a local directory (no hub revision to pick)"),
    "code_revision": ((None,), "the draft model is a local directory (no hub revision to pick)"),
    "enforce_eager": ((None,), "the draft runs as the target does (the engine's --enforce-eager)"),
    "moe_backend": ((None,), "the draft runs with the target's kernels"),
    "attention_backend": ((None,), "the draft runs with the target's kernels"),
    "kv_cache_dtype": ((None,), "the draft's KV cache has the target's --kv-cache-dtype"),
    "use_local_argmax_reduction": ((False,), "the draft's argmax reads its all-gathered logits (a per-rank "
                                             "argmax reduced across ranks is not built)"),
    "use_heterogeneous_vocab": ((False,), "the draft must have the target's vocabulary"),
    "parallel_drafting": ((False,), "the draft proposes one token a pass (parallel drafting is not built)"),
    "num_speculative_tokens_per_batch_size": ((None,), "a batch-size schedule of k is not built (see "
                                                       "disable_by_batch_size and max_step_tokens)"),
    "draft_load_config": ((None,), "the draft loads with the target's load_format"),
    "draft_sample_method": (("greedy",), "the draft proposes greedily (its argmax), as vLLM's default"),
    "suffix_decoding_max_tree_depth": ((24,), METHODS_NOT_BUILT["suffix"]),
    "suffix_decoding_max_cached_requests": ((10000,), METHODS_NOT_BUILT["suffix"]),
    "suffix_decoding_max_spec_factor": ((1.0,), METHODS_NOT_BUILT["suffix"]),
    "suffix_decoding_min_token_prob": ((0.1,), METHODS_NOT_BUILT["suffix"]),
}


def take_vllm_keys(value: dict) -> dict:
    """value without the vLLM keys checked here; raises ValueError naming one whose value is not taken."""
    rest = {}
    for key, v in value.items():
        if key not in NEUTRAL:
            rest[key] = v
            continue
        taken, why = NEUTRAL[key]
        if not any(v is t or (t is not None and isinstance(v, bool) == isinstance(t, bool) and v == t)
                   for t in taken):
            raise ValueError(f"speculative_config: {key} must be one of {list(taken)} here, got {v!r}: {why}")
    return rest


def vllm_method(value: dict) -> dict:
    """vLLM's method inference: no method with model "ngram" or "[ngram]" is ngram, with another model
    draft_model; "[ngram]" is ngram (its model then "ngram", as vLLM's). A method not built is refused saying why."""
    value = dict(value)
    method = value.get("method")
    if method is None and "model" in value:
        method = "ngram" if value["model"] in ("ngram", "[ngram]") else "draft_model"
    if method == "[ngram]":
        method = "ngram"
    if method is not None:
        value["method"] = method
    if method == "ngram" and value.get("model") in ("ngram", "[ngram]"):
        del value["model"]   # vLLM's name of no model
    if isinstance(method, str) and (method in METHODS_NOT_BUILT or method.endswith("_mtp")):   # vLLM: *_mtp is mtp
        why = METHODS_NOT_BUILT.get(method, METHODS_NOT_BUILT["mtp"])
        raise ValueError(f"speculative_config: method {method!r} is not built ({why}): use ngram or draft_model")
    return value
