"""Pythonic tool calls (Llama 3.2, Llama 4, ToolACE): the whole answer is a Python list of calls,
`[get_weather(city="Paris", days=3), now()]`, keyword arguments only, each a literal: a string, a number (a
negative one too), True/False/None (or JSON's true/false/null), a list, a dict with literal keys. The text is read
with `ast`, never evaluated; each call's arguments become JSON (json.dumps, non-ASCII kept). An answer that is not
such a list is content, as vLLM's PythonicToolParser answers it; so is one giving a keyword twice (Python refuses
the call) or a dict key twice (unlike vLLM, which takes the last value: it lands in the first one's place, where a
stream has sent that one already).

Streamed, the list written so far is completed (its open string, brackets and call closed) and parsed at each
delta: a call's name goes out with its first argument (or its ")"), its arguments as the JSON of the completion
less the closers the completion added. So that every fragment is a prefix of the final arguments, a value goes
out only once it cannot change: a number, a name or a closing quote waits for what follows it ("37." may become
37.5, 'a' 'b' is "ab"), an escape for its last character. A list that goes wrong after a call went out (a
non-literal argument, text after its "]", max_tokens) cannot take the call back: the calls out keep their
arguments, closed, and the rest is dropped (as vLLM streams it). The same text in one delta (not streamed) is
content, unless it was cut short.

So that a long value streams in linear time (parsing all of the text at each delta was quadratic: 25 s for a
50 KB string fed 4 characters at a time), only the items whose calls have not ended are parsed (the list before
them is calls already), and while the open call ends in a string that only grows, what is added to it is decoded
on its own and goes out as its JSON, no parse at all. Where the brackets cannot tell the items apart (a comment,
a triple-quoted string), all of the list is parsed at each delta, as before.
"""
import ast
import json
import re
import warnings
from collections import deque

from pagedllm.server.tool_parsers.base import DeltaMessage, ToolParser, partial_suffix

JSON_NAMES = {"true": True, "false": False, "null": None}   # some models write JSON's literals in the call
CLOSER = {"[": "]", "(": ")", "{": "}"}
QUOTES = "'\""
START, END = "<|python_start|>", "<|python_end|>"   # llama4_pythonic's wrapping
# inside a string: an escape that may still go on (a lone backslash; an octal escape of one or two digits)
OPEN_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\[0-7]{0,2}$")
WAITS = "_.+-=:" + QUOTES   # outside a string, a value ending in one of these (or a letter, a digit) may go on


class PythonicToolParser(ToolParser):
    def __init__(self, max_calls: int | None = None, tool_names: tuple[str, ...] = ()):
        super().__init__(max_calls)
        self._pieces: list[str] = []        # the text, in pieces (joined at the finish)
        self._is_list: bool | None = None   # None until the first character that is not whitespace
        self._sent: list[list[str]] = []    # argument text out, per call of the list, in pieces
        # each call's arguments as last completed: (True, what the completion closed of them), the arguments being
        # what is out and that; or (False, the arguments), where what is out is not a prefix of them
        self._closed: list[tuple[bool, str]] = []
        self._num_ended = 0                 # calls of the list whose arguments are all out
        self._brackets = OpenBrackets()
        self._tail = Tail()                 # the list's text from its first item whose call has not ended
        self._last = ""                     # the list's last character that is not whitespace
        self._checked = 0                   # items known to be whole calls (or ended)
        self._string: OpenString | None = None   # the open string of the open call, read without parsing
        self._stuck = False                 # the list can no longer be one of calls: nothing more to parse
        self._in_step = True                # what went out of the last call sent is a prefix of its arguments

    def feed(self, text: str) -> DeltaMessage:
        if self._is_list is not False:
            self._pieces.append(text)
        if self._is_list is None:
            if not text.strip():
                return self._take()
            text = "".join(self._pieces)   # whitespace, then this delta
            self._is_list = text.lstrip()[0] == "["
            if self._is_list:
                text = text.lstrip()
        if self._is_list is False:
            self._content(text)
        elif text:
            self._read_list(text)
        return self._take()

    def finish(self) -> DeltaMessage:
        calls = _calls("".join(self._pieces).strip()) if self._is_list else None
        if calls:   # "[]" calls nothing: content, as vLLM's
            self._emit(calls, None)
        elif self._sent:   # gone wrong (or cut short) after a call went out
            self._close_open_call()
        elif self._is_list is not False:
            self._content("".join(self._pieces))
        self._flush_content()
        return self._take()

    def _read_list(self, text: str):
        """text: the list's new text. Each delta parses at most the items whose calls have not ended (the list
        before them is known to be calls), and none while the open call's string only grows (read on its own)."""
        brackets = self._brackets
        brackets.read(text)
        self._tail.append(text)
        if text.strip():
            self._last = text.rstrip()[-1]
        if brackets.bad or self._stuck:
            return
        if self._string is not None and self._string.changes == brackets.changes:
            self._read_string(text)
            return
        self._string = None
        stack = brackets.stack
        in_string = stack[-1] in QUOTES if stack else False
        if not in_string and (self._last.isalnum() or self._last in WAITS):   # the last value may still change
            return
        if brackets.plain:
            first = min(self._num_ended, len(brackets.starts) - 1)   # the first item whose call has not ended
            self._tail.drop_to(brackets.starts[first])
            if not self._whole_items(first):
                return
            text = "[" + self._tail.text()
        else:   # its items may not be where the brackets saw them: all of the list, each time
            first, text = 0, "".join(self._pieces).lstrip()
        read = _read_partial(text, stack)
        if read is None:
            return
        calls, open_closers = read
        self._emit(calls, open_closers, first)
        i = first + len(calls) - 1   # the open call: a string that only grows is read without parsing from now on
        if in_string and open_closers is not None and self._num_ended <= i < len(self._sent) and self._in_step \
                and brackets.plain and not (brackets.before_quote.isalnum() or brackets.before_quote == "_"):
            # (no prefix: r'', b'', f'') and what it holds ends its call's arguments: one more
            # character in it is one more before the closers (not so where a keyword or key given twice put the
            # value of its first place)
            probe = _read_partial(text + "Z", stack)
            if probe is not None and probe[0][-1][1] == "".join(self._sent[i]) + "Z" + open_closers:
                self._string = OpenString(i, stack[-1], brackets.changes)

    def _whole_items(self, first: int) -> bool:
        """The items from `first` on that a "," closed are each a call with literal arguments (each is checked
        once): else the list can never be one of calls, and it is stuck."""
        starts = self._brackets.starts
        if self._checked >= len(starts) - 1:
            return True
        text, base = self._tail.text(), starts[first]
        for j in range(max(first, self._checked), len(starts) - 1):
            calls = _calls("[" + text[starts[j] - base:starts[j + 1] - 1 - base] + "]")
            if calls is None or len(calls) != 1:
                self._stuck = True
                return False
        self._checked = len(starts) - 1
        return True

    def _read_string(self, text: str):
        """More of the open call's string, its quote not in it: its JSON goes out as it decodes (an escape cut
        short waits for its end, as the completed list would not parse before)."""
        string = self._string
        body = string.pending + text
        if OPEN_ESCAPE.search(body):
            string.pending = body
            return
        try:
            value = _string_body(string.quote, body)
        except (SyntaxError, ValueError, MemoryError):
            # an escape not complete yet (\x4, \N{LATIN ...): wait; one that no text completes (a name of a
            # hundred characters is none) leaves the list unparseable for good, as a raw newline does
            string.pending = body
            self._stuck = len(body) > 256
            return
        string.pending = ""
        fragment = json.dumps(value, ensure_ascii=False)[1:-1]
        self._sent[string.call].append(fragment)
        self._arguments(fragment)

    def _emit(self, calls: list[tuple[str, str]], open_closers: str | None, first: int = 0):
        """calls: those of the list from its item `first` on; open_closers: what the completion closed of the
        last call (None: every call is written whole)."""
        for j, (name, arguments) in enumerate(calls):
            i = first + j
            if i < self._num_ended:
                continue
            whole = j < len(calls) - 1 or open_closers is None
            if not whole and arguments == "{}":   # no argument yet: "f(1" may still be no call
                break
            shown = arguments if whole else arguments[:len(arguments) - len(open_closers)]
            if i == len(self._sent):
                self._start_call(name)
                self._sent.append([])
                self._closed.append((True, ""))
            self._send(i, shown)
            self._closed[i] = (True, "" if whole else open_closers) if self._in_step else (False, arguments)
            if whole:
                self._end()

    def _send(self, i: int, shown: str):
        sent = "".join(self._sent[i])
        self._sent[i] = [sent]
        # a value goes out once it is final; but a keyword given twice (the last value wins) changes what is out
        self._in_step = shown.startswith(sent)
        if self._in_step:
            self._arguments(shown[len(sent):])
            self._sent[i] = [shown]

    def _end(self):
        self._end_call()
        self._num_ended += 1

    def _close_open_call(self):
        """The open call's arguments as last completed."""
        if self._num_ended < len(self._sent):
            in_step, text = self._closed[self._num_ended]
            if in_step:
                self._arguments(text)
            else:
                self._send(self._num_ended, text)
            self._end()


class Llama4PythonicToolParser(PythonicToolParser):
    """Llama 4's: the same list, which the model may wrap in <|python_start|> ... <|python_end|> (seen where
    special tokens are not skipped). An answer opening with START loses both tags; any other is left as it is."""

    def __init__(self, max_calls: int | None = None, tool_names: tuple[str, ...] = ()):
        super().__init__(max_calls, tool_names)
        self._head = ""              # the text while it may still open with START
        self._wrapped: bool | None = None
        self._held = ""              # the end of the text that may begin END

    def feed(self, text: str) -> DeltaMessage:
        return super().feed(self._unwrapped(text, final=False))

    def finish(self) -> DeltaMessage:
        out = super().feed(self._unwrapped("", final=True))
        out.add(super().finish())
        return out

    def _unwrapped(self, text: str, final: bool) -> str:
        """What is new of the text without its tags (a tag's possible start held back until it is known)."""
        if self._wrapped is None:
            self._head += text
            head = self._head.lstrip()
            if not final and START.startswith(head):
                return ""
            self._wrapped = head.startswith(START)
            text, self._head = head[len(START):] if self._wrapped else self._head, ""
        if not self._wrapped:
            return text
        text = self._held + text
        keep = 0 if final else partial_suffix(text, END)
        self._held = text[len(text) - keep:]
        return text[:len(text) - keep].replace(END, "")


class OpenString:
    """The string the open call's text ends in, once a completion parsed with it: what is added to it until its
    quote closes it is its JSON's continuation."""

    def __init__(self, call: int, quote: str, changes: int):
        self.call = call          # the call's index in the list
        self.quote = quote
        self.changes = changes    # the brackets' count of opened and closed when it was parsed
        self.pending = ""         # its text not decoded yet (an escape cut short)


class Tail:
    """A text from a position on, in pieces: appended as it comes, its start dropped once it is not needed."""

    def __init__(self):
        self._pieces: deque[str] = deque()
        self._start = 0   # where the first piece starts in the whole text

    def append(self, text: str):
        self._pieces.append(text)

    def drop_to(self, at: int):
        while self._pieces and self._start + len(self._pieces[0]) <= at:
            self._start += len(self._pieces.popleft())
        if self._pieces and self._start < at:
            self._pieces[0] = self._pieces[0][at - self._start:]
            self._start = at

    def text(self) -> str:
        if len(self._pieces) > 1:
            whole = "".join(self._pieces)
            self._pieces.clear()
            self._pieces.append(whole)
        return self._pieces[0] if self._pieces else ""


def _string_body(quote: str, body: str) -> str:
    """The value of a string's text between its quotes (no prefix): itself without escapes, where the string is
    valid Python (no line break, no NUL, no lone surrogate: UTF-8, as parsing encodes it), else as ast reads it."""
    if "\\" not in body and "\n" not in body and "\r" not in body and "\0" not in body:
        if not body.isascii():
            body.encode()   # a lone surrogate: UnicodeEncodeError, a ValueError (as ast's)
        return body
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # an invalid escape in a string is a SyntaxWarning
        value = ast.literal_eval(quote + body + quote)
    if not isinstance(value, str):
        raise ValueError(body)
    return value


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
        elif text[-1].isalnum() or text[-1] in WAITS:
            return None
    calls = _calls(text + "".join(CLOSER.get(c, c) for c in reversed(stack)))
    if calls is None or len(stack) < 2 or stack[1] != "(":
        return (calls, None) if calls is not None else None
    # the last call is open: its JSON ends with what closes its open values (quotes -> '"'), then its "}"
    closers = "".join('"' if c in QUOTES else CLOSER[c] for c in reversed(stack[2:])) + "}"
    return (calls, closers) if calls and calls[-1][1].endswith(closers) else None


class OpenBrackets:
    """The brackets and the string (its quote) open at the end of the list's text, innermost last, read as the
    text grows (each character once); bad once they mismatch or text other than whitespace follows its "]".
    Where the text is plain (no comment, no triple quote, no strings side by side without a space), the items
    start where they saw them, else they may be wrong."""

    def __init__(self):
        self.stack: list[str] = []
        self.bad = False
        self.starts: list[int] = []   # where each item of the list starts in its text (after its "[" or ",")
        self.changes = 0              # brackets and quotes opened or closed so far
        self.before_quote = ""        # the character before the last string's opening quote
        self.plain = True
        self._escaped = False
        self._num_read = 0
        self._previous = ""

    def read(self, text: str):
        """text: the list's new text."""
        for ch in text:
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
                self.changes += 1
        elif not stack and self._num_read:   # the list has closed
            self.bad = self.bad or not ch.isspace()
        elif ch in QUOTES or ch in CLOSER:
            if ch in QUOTES:
                self.before_quote = self._previous
                self.plain = self.plain and self._previous not in QUOTES
            stack.append(ch)
            self.changes += 1
            if len(stack) == 1:
                self.starts.append(self._num_read + 1)
        elif ch in ")]}":
            self.bad = self.bad or not stack or CLOSER[stack.pop()] != ch
            self.changes += 1
        elif ch == "," and len(stack) == 1:
            self.starts.append(self._num_read + 1)
        elif ch == "#":
            self.plain = False
        self._previous = ch
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
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and not call.args):
            return None
        names = [k.arg for k in call.keywords]
        if not all(names) or len(set(names)) < len(names):   # None: **kwargs; one given twice: Python refuses it
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
        value = {k.value: _literal(v) for k, v in zip(node.keys, node.values)}
        if len(value) == len(node.keys):   # a key given twice: its last value in its first place, unstreamable
            return value
    raise ValueError(f"not a literal: {ast.dump(node)}")
