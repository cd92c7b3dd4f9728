"""Sampling defaults from the model's generation_config.json, as vLLM's `--generation-config auto|vllm|DIR`.

The defaults fill what a request leaves unset: LLM.generate / chat with sampling_params=None take them all
(LLM.get_default_sampling_params()), a server request takes each one it does not give itself. As vLLM's
get_diff_sampling_param, the file's max_new_tokens is the default max_tokens (the server caps it at what a
prompt leaves of max_model_len).
"""
import json
import logging
import os

from pagedllm.sampling_params import SamplingParams

logger = logging.getLogger("pagedllm")

DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens")


def load_default_sampling_params(model_dir: str, generation_config: str, override: dict | None = None) -> dict:
    """auto: model_dir's generation_config.json; vllm: none; otherwise a directory holding the file. override
    (--override-generation-config) goes over the file's values, also with vllm (vLLM's).
    Only the keys of DEFAULT_KEYS the file sets (not null) are taken, max_new_tokens as max_tokens (HF's name
    for it); the log line says which."""
    values, source = _read(model_dir, generation_config)
    if override:
        values, source = {**values, **override}, f"{source} with override_generation_config {override}"
    defaults = {"max_tokens" if k == "max_new_tokens" else k: values[k]
                for k in DEFAULT_KEYS if values.get(k) is not None}
    try:   # checked now, against SamplingParams' own rules: a bad value is the file's, not a later request's
        SamplingParams(**defaults)
    except ValueError as e:
        raise ValueError(f"generation_config: {source} sets a sampling default SamplingParams refuses: {e}") from e
    if defaults and generation_config != "vllm":   # a warning, as vLLM's: the model changes what unset fields mean
        logger.warning("sampling defaults from %s: %s (--generation-config vllm for SamplingParams' own)", source,
                       defaults)
    elif values or override:
        logger.info("sampling defaults from %s: %s", source, defaults or "none (it sets no sampling parameter)")
    else:
        logger.info("sampling defaults: %s", source)
    return defaults


def _read(model_dir: str, generation_config: str) -> tuple[dict, str]:
    """The generation config's values, and where they come from (for the log and errors)."""
    if generation_config == "vllm":
        return {}, "none (generation_config vllm)"
    directory = model_dir if generation_config == "auto" else generation_config
    path = os.path.join(directory, "generation_config.json")
    if not os.path.isfile(path):
        # vLLM's: the directory's config.json stands in for the file (transformers' from_model_config, which takes
        # no sampling parameter from it); a directory with neither is refused
        if generation_config != "auto" and not os.path.isfile(os.path.join(directory, "config.json")):
            raise FileNotFoundError(f"generation_config {generation_config!r} has no generation_config.json "
                                    "(nor a config.json)")
        where = "the model directory" if generation_config == "auto" else repr(generation_config)
        return {}, f"none (no generation_config.json in {where})"
    try:
        with open(path) as f:
            values = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"generation_config: {path} is not valid JSON: {e}") from e
    if not isinstance(values, dict):
        raise ValueError(f"generation_config: {path} must hold a JSON object, got {type(values).__name__}")
    return values, path
