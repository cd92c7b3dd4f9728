"""Token ids' text as it reads after other tokens. Decoded alone, a SentencePiece first token loses its leading
space ("▁loved" -> "loved"); decoded after context and cut after the context's text, it keeps it. No
transformers import here: beam_search uses it and is imported by the CLI's light start."""
import os
from collections.abc import Callable

CONTEXT_TOKENS = 5   # prompt tokens decoded in front of a text's first token (its leading space)


def decode_after(decode: Callable[[list[int]], str], context: list[int], ids: list[int],
                 context_text: str | None = None) -> str:
    """ids' text after context (context_text: decode(context), when the caller has it). Where the joint text does
    not start with the context's (a character merged across them), or there is no context: decode(ids)."""
    head = decode(context) if context_text is None else context_text
    full = decode(context + ids) if head else ""
    return full[len(head):] if head and full.startswith(head) else decode(ids)


def partial_char_text(decode: Callable[[list[int]], str], token_id: int, context: list[int]) -> str:
    """The logprob text of a token whose own text ends in U+FFFD (it holds bytes of a UTF-8 character split over
    tokens), as vLLM gives it: the text it completes after its sequence's preceding tokens (context, at most 4 are
    read), the bytes of the context's own partial tokens included (their texts were ""); "" while incomplete.
    Joined, the tokens' texts (and chat's bytes) are then the sequence's text."""
    for k in range(1, min(len(context), 4) + 1):
        head_ids = context[-k:]
        full = decode(head_ids + [token_id])
        if full.endswith("\ufffd"):
            continue
        clean = len(head_ids)   # the context tokens before the partial ones at its end
        while clean and decode([head_ids[clean - 1]]).endswith("\ufffd"):
            clean -= 1
        head = decode(head_ids[:clean]) if clean else ""
        return full[len(os.path.commonprefix([head, full])):]
    return ""
