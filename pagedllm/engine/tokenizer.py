"""Loading the tokenizer and the set of token ids that end generation."""
import json
import os
import re
from collections.abc import Callable
from functools import lru_cache, partial

from transformers import AutoTokenizer

from pagedllm.engine.hub import hub_unreachable_reason

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def load_tokenizer(path: str, revision: str | None = None, **kwargs):
    """A transformers tokenizer from a local model directory (or a hub id, when one is reachable, at revision;
    kwargs: from_pretrained's, cache_dir and token for a hub id)."""
    if not os.path.exists(path) and not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path):   # a path, and no Hub id
        raise ValueError(f"tokenizer {path!r} is not a local directory: point --tokenizer at a directory with "
                         f"tokenizer files ({', '.join(_TOKENIZER_FILES)})")
    if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        raise ValueError(f"no tokenizer in {path!r}: expected one of {', '.join(_TOKENIZER_FILES)}; "
                         f"point --tokenizer at a directory that has one")
    if not os.path.exists(path):   # a Hub id: downloaded while the hub answers, else only from the local cache
        kwargs["revision"] = revision
        reason = hub_unreachable_reason(path, "tokenizer_config.json", revision)
        if reason is not None:
            return _load_cached_tokenizer(path, reason, **kwargs)
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise ValueError(f"could not load a tokenizer from {path!r}: {e}") from e


def _load_cached_tokenizer(path: str, reason: str, **kwargs):
    """A Hub id's tokenizer from the Hugging Face cache, when the hub cannot be asked (reason says why)."""
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, **kwargs)
    except (OSError, ValueError):
        raise ValueError(f"tokenizer {path!r} is not a local directory and is not in the Hugging Face cache, and "
                         f"{reason}: point --tokenizer at a directory with tokenizer files, or download it "
                         f"first (hf download {path} --local-dir DIR)") from None


def load_engine_tokenizer(config):
    """The engine's tokenizer (config.tokenizer, else the model's); None with skip_tokenizer_init."""
    if config.skip_tokenizer_init:
        return None
    return load_tokenizer(config.tokenizer or config.model, config.tokenizer_revision or config.revision,
                          cache_dir=config.download_dir, token=config.hf_token)


def load_eos_token_ids(model_dir: str, tokenizer, generation_config: str = "auto") -> set[int]:
    """tokenizer.eos_token_id (config.json's without a tokenizer: skip_tokenizer_init) plus the generation
    config's eos_token_id, because chat models often end turns with a token (e.g. <|eot_id|>) that only the
    generation config names. As vLLM's try_get_generation_config: the generation config is
    generation_config.json of the model directory (auto, and vllm, which drops only its sampling defaults) or of
    the directory --generation-config names; without that file, the same directory's config.json stands in for
    it (transformers' GenerationConfig.from_model_config), so its eos_token_id ends an output too."""
    if tokenizer is None:
        eos = _eos_token_ids(os.path.join(model_dir, "config.json"))
    else:
        eos = set() if tokenizer.eos_token_id is None else {int(tokenizer.eos_token_id)}
    source = model_dir if generation_config in ("auto", "vllm") else generation_config
    path = os.path.join(source, "generation_config.json")
    if os.path.isfile(path):
        return eos | _eos_token_ids(path)
    return eos | _eos_token_ids(os.path.join(source, "config.json"), decoder_fallback=True)


def _eos_token_ids(path: str, decoder_fallback: bool = False) -> set[int]:
    """A JSON file's eos_token_id (an int or a list of them); none when the file or key is missing.
    decoder_fallback: a config.json without one at the top takes its decoder's (text_config, decoder or
    generator: from_model_config's)."""
    if not os.path.isfile(path):
        return set()
    with open(path) as f:
        values = json.load(f)
    value = values.get("eos_token_id")
    if value is None and decoder_fallback:
        inner = next((values[k] for k in ("decoder", "generator", "text_config") if values.get(k)), None)
        value = inner.get("eos_token_id") if isinstance(inner, dict) else None
    return {int(t) for t in (value if isinstance(value, list) else [value]) if t is not None}


@lru_cache(maxsize=8)   # a tokenizer's own: asked for each truncated prompt
def num_added_tokens(tokenizer) -> tuple[int, int]:
    """How many special tokens encode(text) adds before and after the text's own tokens (Llama-3: its
    <|begin_of_text|>, (1, 0); Qwen3: none, (0, 0))."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    for front in range(len(full) - len(plain) + 1):
        if full[front:front + len(plain)] == plain:
            return front, len(full) - front - len(plain)
    return 0, 0


def raw_decoder(tokenizer, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    """ids -> tokenizer.decode(ids, skip_special_tokens=..., clean_up_tokenization_spaces=False), for the
    per-token paths (detokenization, logprob tokens). When the tokenizer's decode only forwards to its Rust
    tokenizer (a fast tokenizer whose class overrides neither decode nor _decode), that decode is called
    directly: transformers' wrapper (argument conversion, kwargs) costs twice the Rust decode of a few ids."""
    backend = getattr(tokenizer, "_tokenizer", None)
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
        forwards = (type(tokenizer).decode is PreTrainedTokenizerBase.decode
                    and type(tokenizer)._decode is TokenizersBackend._decode)
    except (ImportError, AttributeError):   # another transformers layout: take the general path
        forwards = False
    if forwards and backend is not None:
        return partial(backend.decode, skip_special_tokens=skip_special_tokens)
    return partial(tokenizer.decode, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)
