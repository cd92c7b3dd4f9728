"""Pythonic tool calls (Llama 3.2, Llama 4, ToolACE): the whole answer is a Python list of calls,
`[get_weather(city="Paris", days=3), now()]`, keyword arguments only, each a literal: a string, a number (a
negative one too), True/False/None (or JSON's true/false/null), a list, a dict with literal keys. The text is read
with `ast`, never evaluated; each call's arguments become JSON (json.dumps, non-ASCII kept). An answer that is not
such a list is content, as vLLM's PythonicToolParser answers it.

Streamed, the list written so far is completed (its open string, brackets and call closed) and parsed at each
delta: a call's name goes out with its first argument (or its ")"), its arguments as the JSON of the completion
less the closers the completion added. So that every fragment is a prefix of the final arguments, a value goes
out only once it cannot change: a number, a name or a closing quote waits for what follows it ("37." may become
37.5, 'a' 'b' is "ab"), an escape for its last character. A list that goes wrong after a call went out (a
non-literal argument, text after its "]", max_tokens) cannot take the call back: the calls out keep their
arguments, closed, and the rest is dropped (as vLLM streams it). The same text in one delta (not streamed) is
content, unless it was cut short.
"""
import ast
import json
import re
import warnings

from pagedllm.server.tool_parsers.base import DeltaMessage, ToolParser, partial_suffix

JSON_NAMES = {"true": True, "false": False, "null": None}   # some models write JSON's literals in the call
CLOSER = {"[": "]", "(": ")", "{": "}"}
QUOTES = "'\""
START, END = "<|python_start|>", "<|python_end|>"   # llama4_pythonic's wrapping
# inside a string: an escape that may still go on (a lone backslash; an octal escape of one or two digits)
OPEN_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\[0-7]{0,2}$")


class PythonicToolParser(ToolParser):
    def __init__(self, max_calls: int | None = None, tool_names: tuple[str, ...] = ()):
        super().__init__(max_calls)
        self._text = ""
        self._is_list: bool | None = None   # None until the first character that is not whitespace
        self._sent: list[str] = []          # argument text out, per call of the list
        self._closed: list[str] = []        # each call's arguments as last completed
        self._num_ended = 0                 # calls of the list whose arguments are all out
        self._brackets = OpenBrackets()

    def feed(self, text: str) -> DeltaMessage:
        self._text += text
        if self._is_list is None and self._text.strip():
            self._is_list = self._text.lstrip()[0] == "["
            text = self._text
        if self._is_list is False:
            self._content(text)
        elif self._is_list:
            text = self._text.lstrip()
            self._brackets.read(text)
            read = None if self._brackets.bad else _read_partial(text, self._brackets.stack)
            if read is not None:
                self._emit(*read)
        return self._take()

    def finish(self) -> DeltaMessage:
        calls = _calls(self._text.strip()) if self._is_list else None
        if calls:   # "[]" calls nothing: content, as vLLM's
            self._emit(calls, None)
        elif self._sent:   # gone wrong (or cut short) after a call went out
            self._close_open_call()
        elif self._is_list is not False:
            self._content(self._text)
        self._flush_content()
        return self._take()

    def _emit(self, calls: list[tuple[str, str]], open_closers: str | None):
        """open_closers: what the completion closed of the last call (None: every call is written whole)."""
        for i, (name, arguments) in enumerate(calls):
            if i < self._num_ended:
                continue
            whole = i < len(calls) - 1 or open_closers is None
            if not whole and arguments == "{}":   # no argument yet: "f(1" may still be no call
                break
            shown = arguments if whole else arguments[:len(arguments) - len(open_closers)]
            if i == len(self._sent):
                self._start_call(name)
                self._sent.append("")
                self._closed.append(arguments)
            self._closed[i] = arguments
            self._send(i, shown)
            if whole:
                self._end()

    def _send(self, i: int, shown: str):
        if shown.startswith(self._sent[i]):   # always: a value goes out once it is final
            self._arguments(shown[len(self._sent[i]):])
            self._sent[i] = shown

    def _end(self):
        self._end_call()
        self._num_ended += 1

    def _close_open_call(self):
        if self._num_ended < len(self._sent):
            self._send(self._num_ended, self._closed[self._num_ended])
            self._end()


class Llama4PythonicToolParser(PythonicToolParser):
    """Llama 4's: the same list, which the model may wrap in <|python_start|> ... <|python_end|> (seen where
    special tokens are not skipped). An answer opening with START loses both tags; any other is left as it is."""

    def __init__(self, max_calls: int | None = None, tool_names: tuple[str, ...] = ()):
        super().__init__(max_calls, tool_names)
        self._raw = ""
        self._passed = 0   # characters of the unwrapped text given to the pythonic parser

    def feed(self, text: str) -> DeltaMessage:
        self._raw += text
        return super().feed(self._unwrapped(final=False))

    def finish(self) -> DeltaMessage:
        out = super().feed(self._unwrapped(final=True))
        out.add(super().finish())
        return out

    def _unwrapped(self, final: bool) -> str:
        """What is new of the text without its tags (a tag's possible start held back until it is known)."""
        head = self._raw.lstrip()
        if not final and START.startswith(head):
            return ""
        text = head[len(START):].replace(END, "") if head.startswith(START) else self._raw
        if not final and head.startswith(START):
            text = text[:len(text) - partial_suffix(text, END)]
        new, self._passed = text[self._passed:], len(text)
        return new


def _read_partial(text: str, stack: list[str]) -> tuple[list[tuple[str, str]], str | None] | None:
    """(calls, closers of the open call or None) of a list being written, stack its open brackets; None while the
    end of text may still change the last value, or when the text cannot be completed into a list of calls."""
    if stack and stack[-1] in QUOTES:
        if OPEN_ESCAPE.search(text):
            return None
    else:
        text = text.rstrip()
        if text[-1] == ",":
            text = text[:-1]
        elif text[-1].isalnum() or text[-1] in "_.+-=:" + QUOTES:
            return None
    calls = _calls(text + "".join(CLOSER.get(c, c) for c in reversed(stack)))
    if calls is None or len(stack) < 2 or stack[1] != "(":
        return (calls, None) if calls is not None else None
    # the last call is open: its JSON ends with what closes its open values (quotes -> '"'), then its "}"
    closers = "".join('"' if c in QUOTES else CLOSER[c] for c in reversed(stack[2:])) + "}"
    return (calls, closers) if calls and calls[-1][1].endswith(closers) else None


class OpenBrackets:
    """The brackets and the string (its quote) open at the end of the list's text, innermost last, read as the
    text grows (each character once); bad once they mismatch or text other than whitespace follows its "]"."""

    def __init__(self):
        self.stack: list[str] = []
        self.bad = False
        self._escaped = False
        self._num_read = 0

    def read(self, text: str):
        """text: all of the list's text so far."""
        for ch in text[self._num_read:]:
            self._char(ch)

    def _char(self, ch: str):
        stack = self.stack
        if stack and stack[-1] in QUOTES:
            if self._escaped:
                self._escaped = False
            elif ch == "\\":
                self._escaped = True
            elif ch == stack[-1]:
                stack.pop()
        elif not stack and self._num_read:   # the list has closed
            self.bad = self.bad or not ch.isspace()
        elif ch in QUOTES or ch in CLOSER:
            stack.append(ch)
        elif ch in ")]}":
            self.bad = self.bad or not stack or CLOSER[stack.pop()] != ch
        self._num_read += 1


def _calls(source: str) -> list[tuple[str, str]] | None:
    """[(name, arguments as JSON)] of a list of calls with literal keyword arguments; None for anything else."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # an invalid escape in a string is a SyntaxWarning
        try:
            tree = ast.parse(source, mode="eval").body
        except (SyntaxError, ValueError, MemoryError, RecursionError):
            return None
    if not isinstance(tree, ast.List):
        return None
    calls = []
    for call in tree.elts:
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and not call.args
                and all(k.arg for k in call.keywords)):   # k.arg None: **kwargs
            return None
        try:
            arguments = {k.arg: _literal(k.value) for k in call.keywords}
            calls.append((call.func.id, json.dumps(arguments, ensure_ascii=False, allow_nan=False)))
        except (ValueError, TypeError, RecursionError):   # not a literal; inf (1e999); bytes as a dict key
            return None
    return calls


def _literal(node: ast.expr):
    if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (str, int, float))):
        return node.value
    if isinstance(node, ast.Name) and node.id in JSON_NAMES:
        return JSON_NAMES[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant) \
            and type(node.operand.value) in (int, float):   # -1 is an operator on 1; not -True
        return -node.operand.value
    if isinstance(node, ast.List):
        return [_literal(v) for v in node.elts]
    if isinstance(node, ast.Dict) and all(isinstance(k, ast.Constant) for k in node.keys):   # None: **spread
        return {k.value: _literal(v) for k, v in zip(node.keys, node.values)}
    raise ValueError(f"not a literal: {ast.dump(node)}")
