"""vLLM's dict prompts by name (vllm.TextPrompt, vllm.TokensPrompt): plain dicts, so `from pagedllm import
TokensPrompt` serves a script written for vLLM; the keys taken are those of prompt_value (engine/input_processor.py)."""
from typing import NotRequired, TypedDict


class TextPrompt(TypedDict):
    prompt: str                                # the text, tokenized with the model's tokenizer
    cache_salt: NotRequired[str]               # only requests of the same salt share cached blocks


class TokensPrompt(TypedDict):
    prompt_token_ids: list[int]                # run as given
    prompt: NotRequired[str]                   # their text, only the outputs' prompt
    cache_salt: NotRequired[str]
