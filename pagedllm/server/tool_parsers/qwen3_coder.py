"""Qwen3-Coder tool calls (Qwen3-Coder, Qwen3.5): XML with one block a parameter and values as plain text,
converted to the type the tool's schema gives them (param_values.py), as vLLM's qwen3_coder parser reads them:

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>

Any number of calls, anywhere in the text; the text around them is content. A `<function=...>` without the
`<tool_call>` before it is a call too, as vLLM reads one. A value loses one newline at each end, nothing else.

A value may hold the tags itself (code that writes this format): `</parameter>` ends it only where the next
non-space text opens a parameter or closes the function or the call (or the text ends), and a `<parameter=`
at the start of a line inside it opens a nested one that a later `</parameter>` closes. A value that never
closes ends before the next declared parameter not yet given (a model that forgot the tag), else at the
function's end, else with the text (cut off by max_tokens: the call keeps what was written).

The arguments are written as vLLM writes them, `{"a": 1, "b": "x"}`, one fragment a parameter once its value
has ended, so the stream's fragments concatenate to the non-streamed arguments. A value is read as it comes, each
character once (it was searched again from its start at each delta: 36 s for 50 KB of code holding the tags).
"""
import json

from pagedllm.server.tool_parsers.base import DeltaMessage, ToolParser, partial_suffix
from pagedllm.server.tool_parsers.param_values import convert

START, END = "<tool_call>", "</tool_call>"
FUNCTION, FUNCTION_END = "<function=", "</function>"
PARAM, PARAM_END = "<parameter=", "</parameter>"
NOT_IN_NAME = set("{}<>\"' \t\n\r")   # a name with these is a template or prose, not a function (vLLM's rule)
AFTER_VALUE = (PARAM, FUNCTION_END, END)   # what may follow a closing </parameter>


class Qwen3CoderToolParser(ToolParser):
    def __init__(self, max_calls: int | None = None, schemas: dict[str, dict] | None = None):
        super().__init__(max_calls)
        self._schemas = schemas or {}   # a tool's name -> its parameters schema
        self._read = self._read_content  # the state: which part of a call (or content) the buffer starts in
        self._buf = ""                  # text read but not yet placed
        self._raw = ""                  # the tags read of a call not yet named (content if it never is)
        self._props: dict = {}          # the called function's declared parameters
        self._seen: set[str] = set()    # its parameters given so far
        self._num_args = 0              # its parameters written to the arguments
        self._param = ""                # the parameter whose value is being read
        self._value: ValueEnd | None = None   # where that value ends, read as it comes

    @classmethod
    def for_request(cls, max_calls: int | None, tools: list[dict]) -> "Qwen3CoderToolParser":
        return cls(max_calls, {t["function"]["name"]: t["function"].get("parameters") or {} for t in tools})

    def feed(self, text: str) -> DeltaMessage:
        self._buf += text
        while self._read(False):
            pass
        return self._take()

    def finish(self) -> DeltaMessage:
        while self._read(True):
            pass
        self._flush_content()
        return self._take()

    # Each state places what it can of the buffer; True when the next state should read on.

    def _read_content(self, final: bool) -> bool:
        tags = [i for i in (self._buf.find(START), self._buf.find(FUNCTION)) if i >= 0]
        if not tags:   # all but a possible start of a tag is content
            keep = 0 if final else max(partial_suffix(self._buf, START), partial_suffix(self._buf, FUNCTION))
            self._content(self._buf[:len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep:]
            return False
        i = min(tags)
        self._content(self._buf[:i])
        self._buf, self._raw = self._buf[i:], ""
        tag = START if self._buf.startswith(START) else FUNCTION
        self._move(len(tag), self._read_open if tag == START else self._read_name)
        return True

    def _read_open(self, final: bool) -> bool:
        """After <tool_call>: whitespace, then <function=."""
        rest = self._buf.lstrip()
        if rest.startswith(FUNCTION):
            self._move(len(self._buf) - len(rest) + len(FUNCTION), self._read_name)
            return True
        if FUNCTION.startswith(rest) and not final:
            return False
        return self._not_a_call()

    def _read_name(self, final: bool) -> bool:
        end = self._buf.find(">")
        name = self._buf if end < 0 else self._buf[:end]
        if NOT_IN_NAME & set(name) or (end < 0 and final) or end == 0:
            return self._not_a_call()
        if end < 0:
            return False
        self._start_call(name)
        self._props = _properties(self._schemas.get(name))
        self._seen, self._num_args = set(), 0
        self._buf, self._read = self._buf[end + 1:], self._read_body
        return True

    def _read_body(self, final: bool) -> bool:
        """One parameter, or the function's end."""
        rest = self._buf.lstrip()
        skipped = len(self._buf) - len(rest)
        if rest.startswith(FUNCTION_END):
            self._buf, self._read = rest[len(FUNCTION_END):], self._read_close
            return True
        if not rest.startswith(PARAM):
            return self._skip_to_tag(rest, final)
        gt = rest.find(">")
        if gt < 0:
            if final:   # cut off inside a parameter's name: not given
                self._buf, self._read = "", self._read_close
            return final
        start = skipped + gt + 1
        if start == len(self._buf) and not final:   # whether a newline opens the value is not known yet
            return False
        start += self._buf.startswith("\n", start)
        self._param = rest[len(PARAM):gt]
        self._value = ValueEnd(self._buf[start - 1], set(self._props) - self._seen - {self._param})
        self._buf, self._read = self._buf[start:], self._read_value
        return True

    def _read_value(self, final: bool) -> bool:
        """A parameter's value, up to its end (the value is read once, however many deltas it takes)."""
        end = self._value.read(self._buf, final)
        self._buf = ""
        if end is None:
            return False
        value, self._buf = end
        self._value, self._read = None, self._read_body
        self._parameter(self._param, value)
        return True

    def _read_close(self, final: bool) -> bool:
        """After </function>: whitespace and </tool_call>, if they come (other text is content)."""
        rest = self._buf.lstrip()
        if END.startswith(rest) and rest != END and not final:
            return False
        self._buf = rest[len(END):] if rest.startswith(END) else rest
        if self._num_args:
            self._arguments("}")
        self._end_call()
        self._read = self._read_content
        return True

    def _not_a_call(self) -> bool:
        """Tags that open no call: the first is content, the text after it is read again."""
        text = self._raw + self._buf
        tag = START if text.startswith(START) else FUNCTION
        self._content(tag)
        self._buf, self._read = text[len(tag):], self._read_content
        return True

    def _move(self, n: int, read):
        self._raw += self._buf[:n]
        self._buf, self._read = self._buf[n:], read

    def _skip_to_tag(self, rest: str, final: bool) -> bool:
        """Stray text in the body before the next parameter or the function's end is dropped."""
        at = [i for i in (rest.find("\n" + PARAM) + 1, rest.find(FUNCTION_END)) if i > 0]
        if at:
            self._buf = rest[min(at):]
            return True
        if final:
            self._buf, self._read = "", self._read_close
        return final

    def _parameter(self, name: str, value: str):
        if value.endswith("\n"):
            value = value[:-1]
        if name in self._seen:   # given twice: the first stays (its fragment is out already)
            return
        self._seen.add(name)
        converted = convert(value, self._props.get(name))
        self._arguments(("{" if not self._num_args else ", ") + json.dumps(name, ensure_ascii=False) + ": "
                        + json.dumps(converted, ensure_ascii=False))
        self._num_args += 1


def _properties(schema) -> dict:
    props = schema.get("properties") if isinstance(schema, dict) else None
    return props if isinstance(props, dict) else {}


class ValueEnd:
    """Where a value ends, read as it comes: a `</parameter>` ends it when the text after it (past spaces) opens
    a parameter or closes the function or the call, or is the end of the output; a `<parameter=` at a line's
    start opens a nested one (depth) that a later `</parameter>` closes.

    Each character is scanned once: the value's text is kept in pieces, and only what may still be part of a tag
    (or a `</parameter>` whose next text is not known yet) is read again with the next delta, so a long value
    streams in linear time."""

    def __init__(self, before: str, next_names: set[str]):
        """before: the character before the value (a newline there starts a line)."""
        self._before = before
        self._next_names = next_names   # declared parameters not given yet: where a value never closed ends
        self._pieces: list[str] = []    # the value's text read, up to the undecided rest
        self._rest = before             # the undecided rest, after the one character before it
        self._depth = 0

    def read(self, text: str, final: bool) -> tuple[str, str] | None:
        """(the value, the text after its end) once the end is known, else None."""
        rest = self._rest + text
        while True:
            close = rest.find(PARAM_END, 1)
            nested = rest.find("\n" + PARAM)
            if nested >= 0 and (close < 0 or nested < close):
                self._depth, at = self._depth + 1, nested + 1 + len(PARAM)
            elif close >= 0:
                at = close + len(PARAM_END)
                if self._depth:
                    self._depth -= 1
                else:
                    follow = rest[at:].lstrip()
                    if follow.startswith(AFTER_VALUE) or (final and not follow):
                        return "".join(self._pieces) + rest[1:close], rest[at:]
                    if not final and any(tag.startswith(follow) for tag in AFTER_VALUE):
                        self._rest = rest   # what follows decides
                        return None
            else:
                break
            self._pieces.append(rest[1:at])   # read past the tag: it stays in the value
            rest = rest[at - 1:]
        if final:
            text = self._before + "".join(self._pieces) + rest[1:]
            value_end, next_at = _unclosed_end(text, 1, self._next_names)
            return text[1:value_end], text[next_at:]
        keep = max(partial_suffix(rest, PARAM_END), partial_suffix(rest, "\n" + PARAM))
        cut = max(1, len(rest) - keep)   # a tag's possible start is read again with the next text
        self._pieces.append(rest[1:cut])
        self._rest = rest[cut - 1:]
        return None


def _unclosed_end(text: str, start: int, next_names: set[str]) -> tuple[int, int]:
    """A value without its </parameter>: up to the next declared parameter not yet given, or the function's
    end, or the end of the text."""
    at = start - 2   # the newline before the value may be the one that starts a parameter's line
    while (at := text.find("\n" + PARAM, at + 1)) >= 0:
        gt = text.find(">", at)
        if gt > 0 and text[at + 1 + len(PARAM):gt] in next_names:
            return at + 1, at + 1
    at = start
    while (at := text.find(FUNCTION_END, at)) >= 0:
        follow = text[at + len(FUNCTION_END):].lstrip()
        if not follow or follow.startswith(END):
            return at, at
        at += 1
    return len(text), len(text)
