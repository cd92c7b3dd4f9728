"""One JSON object {"name": ..., <arguments key>: ...} read incrementally, as a tool call.

The arguments are the value of the first of the arguments keys the object has (hermes reads "arguments" or
"parameters", as models write either); a later one, or a repeated key, is not part of them.

The arguments value is taken as the exact text the model wrote (from its first character to its last, no
surrounding whitespace): an object's fragments are released as they arrive, so their concatenation is that
text and parses whenever the model's did. Arguments given as a JSON string (some models quote them) are
released decoded once complete, when what it holds is JSON (else as the string literal, which is); null gives
none (the caller writes "{}").
"""
import json


class CallScanner:
    def __init__(self, args_keys: tuple[str, ...], stop: str | None = None):
        self.args_keys = args_keys
        self.stop = stop           # a tag (no quotes in it) that ends the call where no string holds it
        self.name: str | None = None
        self.done = False          # the object has closed
        self.stopped = False       # read up to the stop tag, outside any string, before the object closed
        self.keys: list[str] = []  # the object's own keys, in order
        self._text: list[str] = []  # every character read, in pieces (joined only when asked for: `text`)
        self._tail = ""            # the end of it, as long as the stop tag less one character
        self._depth = 0
        self._in_string = self._escape = False
        self._expect = "object"    # at depth 1: key, colon, value, in_value
        self._key: list[str] = []
        self._key_name: str | None = None
        self._value: list[str] = []
        self._is_args = False      # the value being read is the arguments
        self._has_args = False     # an arguments value has begun
        self._streamed = False     # the arguments value is an object/array: released as it comes
        self._ws: list[str] = []   # whitespace inside it, released with the next other character
        self._ready: list[str] = []

    @property
    def text(self) -> str:
        """Every character read (a body that names no function becomes content)."""
        if len(self._text) > 1:
            self._text[:] = ["".join(self._text)]
        return self._text[0] if self._text else ""

    @text.setter
    def text(self, value: str):
        self._text[:] = [value]

    def feed(self, text: str) -> int:
        """Reads text until the object closes; returns how many characters were read. Each character is read
        once and kept as a piece: what was read before is never copied again (a long value streams in linear
        time)."""
        n = len(text)
        for i, ch in enumerate(text):
            self._char(ch)
            if self.done:
                n = i + 1
                break
            # the tag has no quote: its last character outside strings means all of it is
            if self.stop and ch == self.stop[-1] and not self._in_string \
                    and (self._tail + text[:i + 1]).endswith(self.stop):
                self.stopped, n = True, i + 1
                break
        read = text[:n]
        self._text.append(read)
        if self.stop:
            self._tail = (self._tail + read[-len(self.stop):])[-len(self.stop):]
        return n

    def take_arguments(self) -> str:
        out = "".join(self._ready)
        self._ready.clear()
        return out

    def _char(self, ch: str):
        if self._in_string:
            self._add(ch)
            if self._escape:
                self._escape = False
            elif ch == "\\":
                self._escape = True
            elif ch == '"':
                self._in_string = False
                if self._depth == 1 and self._expect == "key":
                    self._key_name, self._expect = _decode('"' + "".join(self._key)), "colon"
                    self.keys.append(self._key_name)
            return
        if self._depth == 0:
            if ch == "{":
                self._depth, self._expect = 1, "key"
            return
        if self._depth == 1:
            self._at_top(ch)
            return
        self._add(ch)
        if ch == '"':
            self._in_string = True
        elif ch in "{[":
            self._depth += 1
        elif ch in "}]":
            self._depth -= 1

    def _at_top(self, ch: str):
        """The object's own level: keys, colons, commas, scalar values and container starts."""
        if self._expect == "key":
            if ch == '"':
                self._key, self._in_string = [], True
            elif ch == "}":
                self.done = True
        elif self._expect == "colon":
            if ch == ":":
                self._expect, self._value, self._streamed, self._ws = "value", [], False, []
        elif self._expect == "value":
            if not ch.isspace():
                self._expect = "in_value"
                self._is_args = self._key_name in self.args_keys and not self._has_args
                self._has_args = self._has_args or self._is_args
                self._streamed = self._is_args and ch in "{["
                self._add(ch)
                self._in_string = ch == '"'
                self._depth += ch in "{["
        elif ch in ",}":   # in_value: the value ends
            self._end_value()
            self._expect = "key"
            self.done = ch == "}"
        elif not self._streamed:   # a streamed value's container has closed: what follows is not in it
            self._add(ch)

    def _add(self, ch: str):
        if self._expect == "key":
            self._key.append(ch)
        elif not self._streamed:
            self._value.append(ch)
        elif ch.isspace():
            self._ws.append(ch)
        else:
            if self._ws:
                self._ready.extend(self._ws)
                self._ws.clear()
            self._ready.append(ch)

    def _end_value(self):
        if self._streamed:
            self._ws.clear()
            return
        raw = "".join(self._value).strip()
        try:
            value = json.loads(raw)
        except (json.JSONDecodeError, RecursionError):   # not JSON, or nested past the decoder's depth
            value = raw
        if self._key_name == "name" and isinstance(value, str) and self.name is None:
            self.name = value
        elif self._is_args and value is not None:   # a quoted string: its text, where that is JSON
            self._ready.append(value if isinstance(value, str) and _is_json(value) else raw)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return False
    return True


def _decode(literal: str):
    try:
        return json.loads(literal)
    except json.JSONDecodeError:
        return literal
