"""vLLM 0.26's tokenization_kwargs (its overrides of tokenizer.encode), as LLM.generate and AsyncLLM.generate
take them: truncate_prompt_tokens and truncation_side become SamplingParams' fields of those names (vLLM 0.26
moved them here; None: unset), or transformers' truncation and max_length (hf_truncation); a text cut without a
side keeps its BOS, one cut from a side given loses it from the left (vLLM's, as its server: InputProcessor);
add_special_tokens false encodes a text prompt without the tokenizer's BOS (etc.); max_length is also the most
tokens a prompt may have (with_max_length). Any other key is refused, naming it."""
import dataclasses

from pagedllm.engine.input_processor import prompt_value
from pagedllm.sampling_params import SamplingParams

TOKENIZATION_KEYS = ("add_special_tokens", "truncate_prompt_tokens", "truncation_side", "truncation", "max_length")


def check_tokenization_kwargs(kwargs: dict | None):
    """None or {} (vLLM's default) is taken; keys of TOKENIZATION_KEYS too; anything else is a ValueError."""
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ValueError(f"tokenization_kwargs must be a dict, got {type(kwargs).__name__}")
    other = sorted(set(kwargs or ()) - set(TOKENIZATION_KEYS))
    if other:
        raise ValueError(f"tokenization_kwargs {other!r:.200} is not built here: the keys taken are "
                         f"{', '.join(TOKENIZATION_KEYS)}; a TokensPrompt gives exact token ids")


def apply_tokenization_kwargs(kwargs: dict | None, prompts: list, params: list[SamplingParams],
                              tokenizer) -> tuple[list, list[SamplingParams]]:
    """The prompts and their params as tokenization_kwargs ask (checked here; None or {}: as they are)."""
    check_tokenization_kwargs(kwargs)
    if not kwargs:
        return prompts, params
    fields = {k: v for k, v in kwargs.items() if k in ("truncate_prompt_tokens", "truncation_side")
              and v is not None}
    fields.update(hf_truncation(kwargs))
    if fields:
        try:
            params = [dataclasses.replace(p, **fields) for p in params]
        except ValueError as e:
            raise ValueError(f"tokenization_kwargs: {e}") from e
    special = kwargs.get("add_special_tokens")
    if special is not None and not isinstance(special, bool):
        raise ValueError(f"tokenization_kwargs: add_special_tokens must be a bool, got {special!r:.50}")
    if special is False and tokenizer is not None:
        prompts = [encoded(p, tokenizer, add_special_tokens=False) for p in prompts]
    if kwargs.get("max_length") is not None:
        prompts, params = with_max_length(kwargs["max_length"], prompts, params, tokenizer)
    return prompts, params


def encoded(prompt, tokenizer, add_special_tokens: bool = True):
    """A text prompt (a string, or a dict of text without token ids) as a TokensPrompt of its encoding, its text
    kept as the outputs' prompt; any other prompt as it is."""
    text = prompt.get("prompt") if isinstance(prompt, dict) and "prompt_token_ids" not in prompt else prompt
    if not isinstance(text, str):
        return prompt
    ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    return {**(prompt if isinstance(prompt, dict) else {}), "prompt": text, "prompt_token_ids": ids}


def with_max_length(max_length, prompts: list, params: list[SamplingParams], tokenizer) -> tuple[list, list]:
    """vLLM 0.26's max_length (TokenizeParams.with_kwargs): the most input tokens, checked after any truncation.
    So truncate_prompt_tokens may not be more, its -1 is max_length, and an untruncated prompt of more tokens is
    refused: encoded here for the count (once: it goes on as its ids)."""
    if type(max_length) is not int or max_length < 1:
        raise ValueError(f"tokenization_kwargs: max_length must be a positive integer, got {max_length!r:.50}")
    checked_prompts, checked_params = [], []
    for prompt, p in zip(prompts, params):
        k = p.truncate_prompt_tokens
        if k is not None and k > max_length:
            raise ValueError(f"tokenization_kwargs: truncate_prompt_tokens ({k}) must be at most max_length "
                             f"({max_length})")
        if k == -1:
            p = dataclasses.replace(p, truncate_prompt_tokens=max_length)
        if k is None:
            if tokenizer is not None:   # without one a text is refused where it enters
                prompt = encoded(prompt, tokenizer)
            ids = prompt_value(prompt)
            if not isinstance(ids, str) and len(ids) > max_length:
                raise ValueError(f"tokenization_kwargs: the prompt has {len(ids)} tokens, more than max_length "
                                 f"({max_length})")
        checked_prompts.append(prompt)
        checked_params.append(p)
    return checked_prompts, checked_params


def hf_truncation(kwargs: dict) -> dict:
    """transformers' truncation and max_length, as vLLM 0.26's TokenizeParams.with_kwargs reads them: truncation
    True (or "longest_first") keeps max_length tokens (unset: max_model_len, -1), False (or "do_not_truncate")
    none, over truncate_prompt_tokens (vLLM's own skips a falsy truncation, so that False, unlike its synonym
    "do_not_truncate", leaves truncate_prompt_tokens on). Any other value is refused: vLLM warns and ignores it."""
    truncation, max_length = kwargs.get("truncation"), kwargs.get("max_length")
    if truncation in (True, "longest_first"):
        return {"truncate_prompt_tokens": -1 if max_length is None else max_length}
    if truncation not in (None, False, "do_not_truncate"):
        raise ValueError(f"tokenization_kwargs: truncation must be True, False, 'longest_first' or "
                         f"'do_not_truncate', got {truncation!r:.50}")
    return {"truncate_prompt_tokens": None} if truncation is not None else {}
