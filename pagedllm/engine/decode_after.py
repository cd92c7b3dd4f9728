"""Token ids' text as it reads after other tokens. Decoded alone, a SentencePiece first token loses its leading
space ("▁loved" -> "loved"); decoded after context and cut after the context's text, it keeps it. No
transformers import here: beam_search uses it and is imported by the CLI's light start."""
from collections.abc import Callable

CONTEXT_TOKENS = 5   # prompt tokens decoded in front of a text's first token (its leading space)


def decode_after(decode: Callable[[list[int]], str], context: list[int], ids: list[int],
                 context_text: str | None = None) -> str:
    """ids' text after context (context_text: decode(context), when the caller has it). Where the joint text does
    not start with the context's (a character merged across them), or there is no context: decode(ids)."""
    head = decode(context) if context_text is None else context_text
    full = decode(context + ids) if head else ""
    return full[len(head):] if head and full.startswith(head) else decode(ids)
