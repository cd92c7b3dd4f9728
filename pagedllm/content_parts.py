"""A chat message's content parts as vLLM 0.26's chat_utils reads them, for a model that takes text only.

    "a string"                                        ->  a text part of that text
    text, input_text, output_text   (its "text")      ->  a text part
    refusal                         (its "refusal")   ->  a text part of the refusal
    thinking                        (its "thinking")  ->  a text part of the thought ("closed" is not rendered)
    tool_reference                  (its "name")      ->  kept for the template: {"type": "tool_reference", "name"}
    text or refusal with its text null or missing     ->  left out (vLLM skips them)
    the others with it null or missing                ->  kept with a null text (name), as vLLM's parsers give
                                                          it to the template; the string format leaves it out
    image / audio / video parts, embeddings           ->  refused: they need a multimodal model
    any other type, or none                           ->  refused, naming the part's field
    other keys on a text-like part                    ->  kept on its text part (vLLM's), unless vLLM knows the
                                                          key as another type's field (image_url, name, ...)

Each part becomes what vLLM's "openai" content format gives the template; chat_template.template_message
makes the "string" format's text of them.
"""
from typing import Any

# A text-like part's type -> the key its text is under.
TEXT_KEYS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal",
             "thinking": "thinking"}
# Parts vLLM skips when their text is null or missing; the others' None reaches the template.
SKIPPED_WHEN_EMPTY = ("text", "refusal")
TYPES = (*TEXT_KEYS, "tool_reference")
# The fields of vLLM's content part types (its _KNOWN_CONTENT_PART_FIELDS): any other key on a text-like part is
# the client's own (Anthropic's cache_control, say), which vLLM keeps on the part the openai content format gives
# the template; these it drops.
VLLM_PART_FIELDS = frozenset({
    "type", "text", "refusal", "thinking", "closed", "name", "uuid", "data", "file", "prompt_cache_breakpoint",
    "image_url", "image_pil", "image_embeds", "audio_url", "input_audio", "audio_embeds", "video_url"})
# vLLM's media parts (a part of no type holding one of these keys is one too): a text-only model has no use
# for them.
MEDIA = ("image_url", "input_image", "image_pil", "image_embeds", "audio_url", "input_audio", "audio_embeds",
         "video_url", "prompt_embeds")


class ContentPartError(ValueError):
    """A part vLLM refuses or that needs a multimodal model; `param` is the field's path."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def template_parts(content: list, at: str) -> list[dict]:
    """The parts of a content list (at: its path, e.g. "messages.0.content") as the template's openai content
    format gets them; the parts vLLM skips are left out."""
    parts = [_part(p, f"{at}.{j}") for j, p in enumerate(content)]
    return [p for p in parts if p is not None]


def part_text(part: dict) -> str | None:
    """A template part's text, as vLLM's string content format writes it (a tool reference: its name); None
    for a null one, which that format leaves out."""
    return part["text"] if part["type"] == "text" else part["name"]


def _part(part: Any, at: str) -> dict | None:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if not isinstance(part, dict):
        raise ContentPartError(f"{at} must be a string or an object with a type, not {type(part).__name__}", at)
    kind = part.get("type")
    if kind in MEDIA or (kind is None and any(key in part for key in MEDIA)):
        raise ContentPartError(f"{at}: {kind or 'a media'} part needs a multimodal model; this model takes text "
                               "only", f"{at}.type")
    if part.get("uuid") is not None:   # vLLM reads a part with a uuid as a media item, whatever its type
        raise ContentPartError(f"{at}.uuid names a media item; this model takes text only", f"{at}.uuid")
    if not isinstance(kind, str) or kind not in TYPES:
        raise ContentPartError(f"{at}.type must be one of {', '.join(sorted(TYPES))} (a text-only model), not "
                               f"{str(kind)[:40]!r}", f"{at}.type")
    if kind == "tool_reference":
        return {"type": kind, "name": _string_or_none(part, "name", at)}
    key = TEXT_KEYS[kind]
    if part.get(key) is None and kind in SKIPPED_WHEN_EMPTY:
        return None
    extra = {k: v for k, v in part.items() if k not in VLLM_PART_FIELDS}   # as vLLM: not refused, passed on
    return {"type": "text", "text": _string_or_none(part, key, at), **extra}


def _string_or_none(part: dict, key: str, at: str) -> str | None:
    value = part.get(key)
    if value is not None and not isinstance(value, str):
        raise ContentPartError(f"{at}.{key} must be a string or null", f"{at}.{key}")
    return value
