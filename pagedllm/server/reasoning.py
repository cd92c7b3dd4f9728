"""Reasoning parsers (vLLM's --reasoning-parser): a choice's text split into `reasoning` and `content`.

qwen3 and deepseek_r1 read `<think>` ... `</think>`, mistral `[THINK]` ... `[/THINK]`, as vLLM 0.26 does:
- qwen3: the text is reasoning from its start (Qwen3's template opens the thinking block, or the model does) up to
  `</think>`, content after it. `<think>` inside reasoning and any later `</think>` are dropped. A `<tool_call>`
  inside reasoning ends it: the call is content, for the tool parser (not in a constrained answer: the engine
  starts a constraint after `</think>` only, so there only it ends the reasoning). With thinking off
  (chat_template_kwargs enable_thinking false, or reasoning_effort "none") the whole text is content.
- deepseek_r1: reasoning up to the first `</think>` (a `<think>` inside it dropped), content after it, kept
  whole.
- mistral (Magistral; the tags are special tokens, kept in the text for it: `reads_special_tokens`): the text is
  content until the model writes `[THINK]`, reasoning from there up to the first `[/THINK]` (a `[THINK]` inside
  it kept), content after it, kept whole; so a text without `[THINK]` is all content, and one cut off after it
  is reasoning with the text before the tag as content. A `[/THINK]` before any `[THINK]` is dropped (the first
  one, as vLLM's), and a `[THINK]` after it still opens the reasoning (vLLM keeps that stray tag then: it
  splits the whole text at once). A `[TOOL_CALLS]` inside the reasoning stays reasoning: calls are read from
  the content. Where the prompt left a `[THINK]` open in the answer's turn (a continued assistant message),
  the answer opens in reasoning, as the engine's constraint waits for `[/THINK]` then (vLLM's parser alone
  would read it as content). An empty part is null, as under the others (vLLM's gives "" for `[THINK][/THINK]`'s
  reasoning and for an empty answer's content: a stream cannot tell those apart).
Under qwen3 and deepseek_r1 a text without the end tag is all reasoning (a thinking model cut off by max_tokens),
so content is null.
Streamed, a tag split across steps is held back until it is whole or cannot be a tag any more: each text
arrives once, in reasoning or content, and joined they equal the non-streamed answer.
"""
from dataclasses import dataclass

from pagedllm.server.errors import APIError

PARSERS = ("qwen3", "deepseek_r1", "mistral", "mimo")
# vLLM's other names for these parsers: mimo is its name for the qwen3 parser (the same class in its registry)
ALIASES = {"mimo": "qwen3"}
THINK_START, THINK_END, TOOL_CALL = "<think>", "</think>", "<tool_call>"
# each parser's (start, end) tags
TAGS = {"qwen3": (THINK_START, THINK_END), "deepseek_r1": (THINK_START, THINK_END), "mistral": ("[THINK]", "[/THINK]")}


def _kind(parser: str | None) -> str | None:
    """The parser a name (an alias) reads as."""
    return ALIASES.get(parser, parser)


def reads_special_tokens(parser: str | None) -> bool:
    """The parser's tags are special tokens (Magistral's [THINK] and [/THINK]): the text it reads must keep them
    (vLLM's Mistral tokenizer keeps them in the text even when it skips special tokens)."""
    return _kind(parser) == "mistral"


@dataclass
class ReasoningDelta:
    reasoning: str = ""
    content: str = ""

    def add(self, other: "ReasoningDelta"):
        self.reasoning += other.reasoning
        self.content += other.content


class ReasoningParser:
    def __init__(self, name: str, thinking: bool = True, constrained: bool = False):
        if name not in PARSERS:
            raise ValueError(f"reasoning parser {name!r} is not one of {', '.join(PARSERS)}")
        self.name = name = _kind(name)
        self.start, self.end = TAGS[name]
        self.in_reasoning = thinking
        # constrained: the engine constrains the text after </think> (structured output, an enforced tool call),
        # so the content is that text: a <tool_call> written while reasoning is still reasoning
        self._tool_call_ends = name == "qwen3" and not constrained
        self._held = ""      # the text's end that may be a tag's beginning
        # mistral: the answer opens in content, until [THINK]; a stray [/THINK] before it is dropped once
        self._opened = thinking or name != "mistral"
        self._stray_end = name == "mistral"

    @property
    def ended(self) -> bool:
        """The reasoning is over (its end tag came, or the answer has none: thinking off, the prompt closed the
        block): the rest of the text is content."""
        return not self.in_reasoning and self._opened

    def _tags(self) -> tuple[str, ...]:
        if self.name == "mistral":
            if self.in_reasoning:
                return (self.end,)
            return () if self._opened else (self.start, self.end) if self._stray_end else (self.start,)
        if self.in_reasoning:
            return (THINK_START, THINK_END, TOOL_CALL) if self._tool_call_ends else (THINK_START, THINK_END)
        return (THINK_END,) if self.name == "qwen3" else ()

    def feed(self, text: str) -> ReasoningDelta:
        out = ReasoningDelta()
        text, self._held = self._held + text, ""
        while text:
            tags = self._tags()
            found = [(text.find(t), t) for t in tags if t in text]
            if found:
                at, tag = min(found)
                self._emit(out, text[:at])
                text = text[at + len(tag):]
                if tag == TOOL_CALL:           # ends reasoning; the call itself is content
                    self.in_reasoning = False
                    text = tag + text
                elif tag == self.end and self.in_reasoning:
                    self.in_reasoning = False
                elif tag == self.start and not self._opened:   # mistral's [THINK] opens the reasoning
                    self.in_reasoning = self._opened = True
                elif tag == self.end and not self._opened:     # mistral's stray [/THINK]: dropped, once
                    self._stray_end = False
                continue                       # THINK_START in reasoning, THINK_END in content: dropped
            keep = _partial_tag_len(text, tags)
            self._emit(out, text[:len(text) - keep])
            self._held = text[len(text) - keep:]
            break
        return out

    def finish(self) -> ReasoningDelta:
        out = ReasoningDelta()
        self._emit(out, self._held)
        self._held = ""
        return out

    def parse_all(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning, content) of a whole text, each None when empty."""
        out = self.feed(text)
        out.add(self.finish())
        return out.reasoning or None, out.content or None

    def _emit(self, out: ReasoningDelta, text: str):
        if self.in_reasoning:
            out.reasoning += text
        else:
            out.content += text


def _partial_tag_len(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest end of text that begins one of the tags (0: none)."""
    best = 0
    for tag in tags:
        for n in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:n]):
                best = n
                break
    return best


def think_token_ids(tokenizer, parser: str) -> tuple[int, int]:
    """The ids of the parser's tags (`<think>` and `</think>`, mistral's `[THINK]` and `[/THINK]`): each must be
    one token of the vocabulary (as vLLM requires), since the engine watches for the end one (a constraint
    starts after it)."""
    vocab = tokenizer.get_vocab()
    start, end = TAGS[_kind(parser)]
    missing = [tag for tag in (start, end) if tag not in vocab]
    if missing:
        raise ValueError(f"reasoning_parser {parser}: the tokenizer has no {' or '.join(missing)} token (a "
                         f"thinking model's tokenizer has both)")
    return vocab[start], vocab[end]


def check_budget(parser: str | None, budget: int | None, beam_search: bool):
    """thinking_token_budget needs a parser (it knows the tags) and a sampled request."""
    if budget is None:
        return
    if parser is None:
        raise APIError(400, "thinking_token_budget needs the server to run with --reasoning-parser (it knows where "
                            "thinking ends)", "thinking_token_budget", "invalid_value")
    if beam_search:
        raise APIError(400, "thinking_token_budget is not used by beam search", "thinking_token_budget",
                       "invalid_value")


def starts_in_reasoning(parser: str, chat_template_kwargs: dict | None, prompt_ids: list[int],
                        think_ids: tuple[int, int], turn_id: int | None = None) -> bool:
    """Whether the answer opens with reasoning: not when qwen3's switch is off (enable_thinking in the
    template's variables; vLLM's default: on), nor when the prompt already closed the block in the answer's
    own turn (turn_id: see reasoning_ended_in). A mistral answer opens in content (the model writes [THINK]),
    unless the prompt left a [THINK] open in the answer's turn."""
    parser = _kind(parser)
    if parser == "qwen3" and not (chat_template_kwargs or {}).get("enable_thinking", True):
        return False
    if parser == "mistral":
        return reasoning_opened_in(prompt_ids, *think_ids, turn_id)
    return not reasoning_ended_in(prompt_ids, *think_ids, turn_id)


def reasoning_fields(parser: str, thinks: bool, constrained: bool, think_ids: tuple[int, int],
                     budget: int | None, prompt_ids: list[int] = (), include_reasoning: bool = True) -> dict:
    """SamplingParams' reasoning fields for an answer (none: {}), where it opens with reasoning (thinks): a
    constraint then waits for the end token, and thinking_token_budget counts the block. A mistral answer that
    opens in content (the model may write [THINK] itself) gets them too, for the budget; under a constraint as
    vLLM 0.26 (its reasoning_ended): where the prompt holds a [THINK] (Magistral's system prompt shows a closed
    block) or the reasoning is not asked for (include_reasoning false) the constraint holds from the first
    token; where it holds none, the first token decides (reasoning_first_token_decides): [THINK] or the
    constraint's first token."""
    mistral = _kind(parser) == "mistral"
    fields = {"reasoning_start_token_id": think_ids[0], "reasoning_end_token_id": think_ids[1],
              "thinking_token_budget": budget}
    if thinks or (mistral and not constrained):
        return fields
    if mistral and include_reasoning and think_ids[0] not in prompt_ids:
        return {**fields, "reasoning_first_token_decides": True}
    return {}


# The token that opens a chat turn, where the tokenizer has one: Qwen's (ChatML) and DeepSeek's assistant turn,
# and Mistral's (the assistant's answer follows the user's [/INST]).
TURN_STARTS = ("<|im_start|>", "<\uff5cAssistant\uff5c>", "[/INST]")


def turn_start_token_id(tokenizer) -> int | None:
    """The id of the tokenizer's turn-start token (TURN_STARTS), None without one."""
    vocab = tokenizer.get_vocab()
    return next((vocab[t] for t in TURN_STARTS if t in vocab), None)


def num_reasoning_tokens(token_ids, think_ids: tuple[int, int], thinks: bool) -> int:
    """How many of an answer's tokens are its reasoning: up to its end tag (all of them while it is open), when
    it opens with reasoning or with the start tag."""
    start, end = think_ids
    ids = list(token_ids)
    if end is None or not (thinks or (ids and ids[0] == start)):
        return 0
    return ids.index(end) + 1 if end in ids else len(ids)


def _last_tag(prompt_ids: list[int], start_id: int | None, end_id: int | None, turn_id: int | None):
    """The last thinking tag (start_id or end_id) in the prompt's last turn (after its last turn_id), or None."""
    for token in reversed(prompt_ids):
        if token == turn_id:
            return None
        if token == start_id or token == end_id:
            return token
    return None


def reasoning_ended_in(prompt_ids: list[int], start_id: int | None, end_id: int | None,
                       turn_id: int | None = None) -> bool:
    """The prompt closes its thinking block (a template with thinking off writes `<think></think>`): the last
    of the two tags in it is the end tag, within the last turn (after the last turn_id): an earlier turn's
    closed block (an assistant's reasoning sent back in a tool loop) does not close the answer's."""
    return end_id is not None and _last_tag(prompt_ids, start_id, end_id, turn_id) == end_id


def reasoning_opened_in(prompt_ids: list[int], start_id: int | None, end_id: int | None,
                        turn_id: int | None = None) -> bool:
    """The prompt leaves a thinking block open: the last of the two tags in it is the start tag, within the last
    turn (after the last turn_id: a tag the user wrote is not the answer's)."""
    return start_id is not None and _last_tag(prompt_ids, start_id, end_id, turn_id) == start_id
