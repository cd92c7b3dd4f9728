"""What a tool parser gives back: OpenAI-shaped deltas, and the streaming parser every parser is.

A parser reads a choice's text as it is generated (`feed`, then `finish` once) and returns a `DeltaMessage`
each time: content, and tool-call deltas in OpenAI's order (index, id, type and function.name first, then
argument fragments). A non-streamed response is the same parser fed the whole text once (`parse_all`), so the
streamed fragments of a call always concatenate to exactly the non-streamed arguments.
"""
import uuid
from dataclasses import dataclass, field


@dataclass
class ToolCallDelta:
    index: int
    id: str | None = None       # set on a call's first delta, with its name
    name: str | None = None
    arguments: str = ""

    def to_json(self) -> dict:
        if self.id is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        return {"index": self.index, "id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class DeltaMessage:
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self):
        return bool(self.content or self.tool_calls)

    def add(self, other: "DeltaMessage"):
        self.content += other.content
        for call in other.tool_calls:
            self.add_call(call)

    def add_call(self, call: ToolCallDelta):
        """A fragment of the call already last here joins it: one entry per call in a delta."""
        last = self.tool_calls[-1] if self.tool_calls else None
        if last is not None and last.index == call.index and call.id is None:
            last.arguments += call.arguments
        else:
            self.tool_calls.append(ToolCallDelta(call.index, call.id, call.name, call.arguments))

    def to_json(self) -> dict:
        delta = {}
        if self.content:
            delta["content"] = self.content
        if self.tool_calls:
            delta["tool_calls"] = [c.to_json() for c in self.tool_calls]
        return delta


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of text that begins tag (it may complete in the next delta)."""
    for k in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


class ToolParser:
    """Base of the streaming parsers: collects what one feed/finish emits. max_calls (parallel_tool_calls
    false: 1) drops the calls past it, their text included."""

    call_id = staticmethod(new_call_id)   # a call's id (a model whose template checks ids has its own)
    reads_special_tokens = False          # the model marks calls with special tokens: the text must keep them

    def __init__(self, max_calls: int | None = None):
        self.max_calls = max_calls
        self.num_calls = 0
        self._out = DeltaMessage()
        self._held_ws = ""            # content's trailing whitespace: dropped if a call follows it
        self._strip_leading = False   # content right after a call loses its leading whitespace
        self._said = False            # some content (not only whitespace) went out
        self._gap = ""                # whitespace dropped around calls that follow content: kept if more comes
        self._gap_open = False        # the gap is whitespace after a call that more whitespace may lengthen
        self._args_len = 0            # argument text emitted for the current call
        self._dropping = False        # the current call is past max_calls

    @classmethod
    def for_request(cls, max_calls: int | None, tools: list[dict]) -> "ToolParser":
        """The parser of one choice: called with (max_calls, the request's tool names); a format whose values
        follow the tools' schemas takes the tools instead."""
        return cls(max_calls, tuple(t["function"]["name"] for t in tools))

    def feed(self, text: str) -> DeltaMessage:
        raise NotImplementedError

    def finish(self) -> DeltaMessage:
        raise NotImplementedError

    def parse_all(self, text: str) -> tuple[str | None, list[dict]]:
        """(content or None, tool calls as OpenAI's message.tool_calls) of a whole output."""
        delta = self.feed(text)
        delta.add(self.finish())
        calls = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                 for c in delta.tool_calls]
        return delta.content or None, calls

    def _take(self) -> DeltaMessage:
        out, self._out = self._out, DeltaMessage()
        return out

    def _content(self, text: str):
        if self._strip_leading:
            rest = text.lstrip()
            if self._said and (not self._gap or self._gap_open):   # (all of it, in however many deltas it came)
                self._gap += text[:len(text) - len(rest)]
                self._gap_open = bool(self._gap)
            text = rest
            self._strip_leading = not text
            if text:   # content on both sides of calls keeps their whitespace ("Checking.\n<call>\nDone.")
                text, self._gap, self._gap_open = self._gap + text, "", False
        text = self._held_ws + text
        kept = text.rstrip()
        self._said = self._said or bool(kept)
        self._held_ws = text[len(kept):]
        self._out.content += kept

    def _flush_content(self):
        """At the end: trailing whitespace stays only in an answer without calls."""
        if not self.num_calls:
            self._out.content += self._held_ws
        self._held_ws = ""

    def _start_call(self, name: str, call_id: str | None = None):
        """call_id: the id the model wrote for it, where the format has one (else one is made)."""
        if self._said and not self._gap:
            self._gap = self._held_ws
        self._gap_open = False
        self._held_ws, self._args_len = "", 0
        self._dropping = self.max_calls is not None and self.num_calls >= self.max_calls
        if not self._dropping:
            self._out.add_call(ToolCallDelta(self.num_calls, call_id or self.call_id(), name, ""))

    def _arguments(self, text: str):
        if text and not self._dropping:
            self._args_len += len(text)
            self._out.add_call(ToolCallDelta(self.num_calls, arguments=text))

    def _end_call(self, cut: bool = False):
        """A call without arguments (none given, or null) has "{}" (vLLM #28806 lost them). cut: the output ended
        inside the call (max_tokens, a stop string): its arguments are what came, "" too, never an invented "{}"."""
        if not self._args_len and not cut:
            self._arguments("{}")
        if not self._dropping:
            self.num_calls += 1
        self._dropping, self._strip_leading = False, True
