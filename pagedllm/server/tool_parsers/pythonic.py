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
on its own and goes out as its JSON, no parse at all. Once the open call has passed a boundary (a "," or an
opener in its arguments), it is parsed from its last boundary only, after a short context that stands for the
text before it (pythonic_window.py): a long list, dict or run of strings parsed from the call's start at each
delta was quadratic too. The end of a closed list whose calls all went out is not parsed again. The brackets
are read as Python's tokenizer reads them (comments, triple-quoted strings), so that a list holding those is read
so too: all of it was parsed at each delta (200 calls after a comment, fed 3 characters a delta: 2.6 s, against
0.05 s), and a triple-quoted string (code) went out only once it closed.
"""
import json
import re

from pagedllm.server.tool_parsers.base import DeltaMessage, ToolParser, partial_suffix
from pagedllm.server.tool_parsers.pythonic_literal import read_calls, string_body
from pagedllm.server.tool_parsers.pythonic_text import CLOSER, QUOTES, OpenBrackets, OpenString, Tail
from pagedllm.server.tool_parsers.pythonic_window import Window, context, keys_at, new_keys_clash

START, END = "<|python_start|>", "<|python_end|>"   # llama4_pythonic's wrapping
# inside a string: an escape that may still go on (a lone backslash; an octal escape of one or two digits)
OPEN_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\[0-7]{0,2}$")
WAITS = "_.+-=:" + QUOTES   # outside a string, a value ending in one of these (or a letter, a digit) may go on


class PythonicToolParser(ToolParser):
    def __init__(self, max_calls: int | None = None, tool_names: tuple[str, ...] = ()):
        super().__init__(max_calls)
        self._pieces: list[str] = []        # the text, in pieces (joined at the finish)
        self._is_list: bool | None = None   # None until the first character that is not whitespace
        self._sent: list[Tail] = []         # argument text out, per call of the list, in pieces
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
        self._window: Window | None = None  # the open call read from its last boundary on

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
        brackets = self._brackets
        if self._is_list and not brackets.stack and not brackets.bad and self._num_ended == len(brackets.starts):
            # the list closed, each of its items a call that went out whole: nothing to add (a long list's parse
            # would cost as much as all of the stream's)
            self._flush_content()
            return self._take()
        calls = read_calls("".join(self._pieces).strip()) if self._is_list else None
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
        before them is known to be calls), from the open call's last boundary on once it has one (a Window), and
        none while the open call's string only grows (read on its own)."""
        brackets = self._brackets
        brackets.read(text)
        self._tail.append(text)
        if text.strip():
            self._last = text.rstrip()[-1]
        if brackets.bad or self._stuck or brackets.in_comment:   # (a comment holds nothing to read)
            return
        if self._string is not None and self._string.changes == brackets.changes:
            self._read_string(text)
            return
        self._string = None
        if self._num_ended >= len(brackets.starts):   # every item a call that went out whole: nothing to read
            return
        stack = brackets.stack
        in_string = stack[-1][0] in QUOTES if stack else False
        if not in_string and (self._last.isalnum() or self._last in WAITS):   # the last value may still change
            return
        if self._window is not None and self._window.call < self._num_ended:   # its call has ended
            self._window = None
        window = self._window
        if window is not None:
            first, text = window.call, ""
            read = self._read_window(window, stack)
            if read is None:
                return
            calls, open_closers = read if read is not False else ([], None)
            if read is False or not self._emit_window(window, calls, open_closers):
                # what the whole call says goes out (a window never sees it: a key given twice is refused)
                self._window = window = None
            i = first + len(calls) - 1
        if window is None:
            first = min(self._num_ended, len(brackets.starts) - 1)   # the first item whose call has not ended
            self._tail.drop_to(brackets.starts[first])
            if not self._whole_items(first):
                return
            text = "[" + self._tail.text()
            read = _read_partial(text, stack)
            if read is None:
                return
            calls, open_closers = read
            self._emit(calls, open_closers, first)
            i = first + len(calls) - 1
        if not (open_closers is not None and self._num_ended <= i < len(self._sent) and self._in_step):
            return
        if in_string and not (brackets.before_quote.isalnum() or brackets.before_quote == "_"):
            # the open call's string (no prefix: r'', b'', f'') ends its arguments: one more character in it is
            # one more before the closers (not so where a keyword or key given twice put the value of its first
            # place): it is read without parsing from now on
            if self._probe(window, text, stack, open_closers, i):
                self._string = OpenString(i, stack[-1], brackets.changes)
        if i == first:
            self._move_window(window, text, i, read)

    def _read_window(self, window: Window, stack: list[str] | tuple, extra: str = ""):
        """(calls, closers) as _read_partial of the list from the window's call, that call's arguments being the
        JSON after the window's boundary (", " first where it follows an element), or None as _read_partial
        answers (or for a key given again); False where the window cannot tell (the whole call is parsed)."""
        return _after_window(window, _read_partial(window.context + self._tail.text_from(window.start) + extra,
                                                   stack))

    def _emit_window(self, window: Window, calls: list, closers: str | None) -> bool:
        """The window's read out: while its call is open, its arguments' JSON after what is out (a value goes out
        once it is final, as _emit); once it has ended, as _emit (the whole of the call's JSON once). False where
        what is out is not a prefix of them."""
        sent = self._sent[window.call]
        after = calls[0][1]
        if len(calls) > 1 or closers is None:
            calls[0] = (calls[0][0], sent.text()[:window.sent] + after, calls[0][2])
            self._emit(calls, closers, window.call)
            return self._in_step
        shown, done = after[:len(after) - len(closers)], sent.text_from(window.sent)
        if not shown.startswith(done):
            return False
        if len(shown) > len(done):
            sent.append(shown[len(done):])
            self._arguments(shown[len(done):])
        self._closed[window.call] = (True, closers)
        return True

    def _probe(self, window: Window | None, text: str, stack: list[str], closers: str, i: int) -> bool:
        """One more character in the open string is one more before the closers of the call's arguments."""
        if window is None:
            probe = _read_partial(text + "Z", stack)
            return probe is not None and probe[0][-1][1] == self._sent[i].text() + "Z" + closers
        probe = self._read_window(window, stack, "Z")
        return bool(probe) and len(probe[0]) == 1 and probe[0][0][1] == (self._sent[i].text_from(window.sent) + "Z"
                                                                          + closers)

    def _move_window(self, window: Window | None, text: str, i: int, read: tuple):
        """The open call i, all out up to the end (read: what the delta read, as _read_window or _read_partial
        answered): its window starts at the last boundary, if past its start."""
        brackets, sent = self._brackets, self._sent[i]
        boundary = brackets.boundary
        start = window.start if window is not None else brackets.starts[i]
        if boundary is None or boundary.pos <= start:
            return
        if window is not None:
            read_text, at = window.context + self._tail.text_from(window.start), len(window.context) - window.start
        else:   # text: "[" and the list's text from item i
            read_text, at = text, 1 - start
        source = read_text[:boundary.pos + at]
        if boundary.has_elem and source[:-1].rstrip()[-1] in "([{,":   # "[," or ",,": no element before the ","
            return   # (the text up to it would parse, its "," dropped; not so after the window's context)
        if read_text[len(source):].strip():   # text after the boundary: the text up to it is read alone
            read = _read_partial(source, boundary.stack)
            read = _after_window(window, read) if window is not None else read
            if not read or len(read[0]) != 1:
                return
        calls, closers = read
        arguments, tree = calls[0][1], calls[0][2]
        shown = arguments[:len(arguments) - len(closers)]
        if window is not None:   # the JSON between the two boundaries
            if sent.text_from(window.sent)[:len(shown)] != shown:
                return
            length = window.sent + len(shown)
        elif sent.text()[:len(shown)] == shown:
            length = len(shown)
        else:
            return
        keys, path = keys_at(boundary, tree, window)
        source, prefix = context(boundary.stack, path)
        self._window = Window(i, boundary.pos, boundary.stack, boundary.has_elem, length, source, prefix, keys)
        brackets.mark()

    def _whole_items(self, first: int) -> bool:
        """The items from `first` on that a "," closed are each a call with literal arguments (each is checked
        once): else the list can never be one of calls, and it is stuck."""
        starts = self._brackets.starts
        if self._checked >= len(starts) - 1:
            return True
        text, base = self._tail.text(), starts[first]
        for j in range(max(first, self._checked), len(starts) - 1):
            calls = read_calls("[" + text[starts[j] - base:starts[j + 1] - 1 - base] + "]")
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
        # a triple-quoted string's end may have begun (its quotes), and a "\r" may be a "\r\n" (one "\n")
        held = self._brackets.quote_run or int(len(string.quote) == 3 and body.endswith("\r"))
        body, tail = body[:len(body) - held], body[len(body) - held:]
        if OPEN_ESCAPE.search(body):
            string.pending = body + tail
            return
        try:
            value = string_body(string.quote, body)
        except (SyntaxError, ValueError, MemoryError):
            # an escape not complete yet (\x4, \N{LATIN ...): wait; one that no text completes (a name of a
            # hundred characters is none) leaves the list unparseable for good, as a raw newline does
            string.pending = body + tail
            self._stuck = len(body) > 256
            return
        string.pending = tail
        fragment = json.dumps(value, ensure_ascii=False)[1:-1]
        self._sent[string.call].append(fragment)
        self._arguments(fragment)

    def _emit(self, calls: list[tuple[str, str]], open_closers: str | None, first: int = 0):
        """calls: those of the list from its item `first` on; open_closers: what the completion closed of the
        last call (None: every call is written whole)."""
        for j, (name, arguments, _) in enumerate(calls):
            i = first + j
            if i < self._num_ended:
                continue
            whole = j < len(calls) - 1 or open_closers is None
            if not whole and arguments == "{}":   # no argument yet: "f(1" may still be no call
                break
            shown = arguments if whole else arguments[:len(arguments) - len(open_closers)]
            if i == len(self._sent):
                self._start_call(name)
                self._sent.append(Tail())
                self._closed.append((True, ""))
            self._send(i, shown)
            self._closed[i] = (True, "" if whole else open_closers) if self._in_step else (False, arguments)
            if whole:
                self._end()

    def _send(self, i: int, shown: str):
        sent = self._sent[i].text()
        # a value goes out once it is final; but a keyword given twice (the last value wins) changes what is out
        self._in_step = shown.startswith(sent)
        if self._in_step:
            self._arguments(shown[len(sent):])
            self._sent[i].replace(shown)

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


def _after_window(window: Window, read):
    """A read of the window's text after its context (_read_partial's) as _read_window answers it."""
    if read is None:
        return None
    calls, closers = read
    name, arguments, tree = calls[0]
    if not arguments.startswith(window.prefix):
        return False   # (never so: the context's JSON comes first)
    if new_keys_clash(window, tree):
        return None   # a key the text before the boundary has, given again: Python or _literal refuses it
    after = arguments[len(window.prefix):]
    after = (", " if window.has_elem and after[0] not in "]}" else "") + after
    return [(name, after, tree), *calls[1:]], closers


def _read_partial(text: str, stack: list[str] | tuple) -> tuple[list[tuple[str, str, dict]], str | None] | None:
    """(calls, closers of the open call or None) of a list being written, stack its open brackets; None while the
    end of text may still change the last value, or when the text cannot be completed into a list of calls."""
    if stack and stack[-1][0] in QUOTES:
        if OPEN_ESCAPE.search(text) or (len(stack[-1]) == 3 and text.endswith("\r")):   # "\r\n" is one "\n"
            return None
    else:
        text = text.rstrip()
        if text[-1] == ",":
            text = text[:-1]
        elif text[-1].isalnum() or text[-1] in WAITS:
            return None
    calls = read_calls(text + "".join(CLOSER.get(c, c) for c in reversed(stack)))
    if calls is None or len(stack) < 2 or stack[1] != "(":
        return (calls, None) if calls is not None else None
    # the last call is open: its JSON ends with what closes its open values (quotes -> '"'), then its "}"
    closers = "".join('"' if c[0] in QUOTES else CLOSER[c] for c in reversed(stack[2:])) + "}"
    return (calls, closers) if calls and calls[-1][1].endswith(closers) else None
