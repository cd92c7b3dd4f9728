"""The pythonic parser's view of the list's text as it grows, each character read once: the brackets and string
open at its end, where its items start, where the open call's arguments may be read from (a boundary), and text
kept in pieces (appended as it comes, never joined whole per delta)."""
from collections import deque
from dataclasses import dataclass

CLOSER = {"[": "]", "(": ")", "{": "}"}
QUOTES = "'\""


@dataclass
class Boundary:
    """A place in the open call's arguments between two elements: after a "," of its frame, or after the "[" or
    "{" that opened it; the text before it is whole elements, so its JSON is final."""
    pos: int            # in the list's text, after the "," or opener
    stack: tuple        # the brackets open there (no string, no "(" but the call's)
    has_elem: bool      # its innermost frame has an element before it (after a ","; not after an opener)
    low: int            # the fewest brackets open between the last mark (OpenBrackets.mark) and it


class OpenBrackets:
    """The brackets and the string (its quote: ' " \'\'\' or \"\"\") open at the end of the list's text, innermost
    last, read as the text grows (each character once), as Python's tokenizer reads them: a comment runs to the
    line's end, and an empty string right before its quote again opens a triple-quoted one; bad once they
    mismatch or text other than whitespace follows its "]"."""

    def __init__(self):
        self.stack: list[str] = []
        self.bad = False
        self.starts: list[int] = []   # where each item of the list starts in its text (after its "[" or ",")
        self.changes = 0              # brackets and quotes opened or closed so far
        self.before_quote = ""        # the character before the last string's opening quote
        self.in_comment = False
        self.quote_run = 0            # in a triple-quoted string: the quotes at its end (its end may have begun)
        self.boundary: Boundary | None = None   # the last one read
        self.low = 0                  # the fewest brackets open since the last mark
        self._since = 0               # the fewest brackets open since the last boundary
        self._parens = 0              # "(" open inside the call's arguments (a tuple, a parenthesized value)
        self._escaped = False
        self._num_read = 0
        self._previous = ""
        self._opened_at = -1          # where the last string's quote was
        self._empty = ""              # the quote of an empty string that the last character closed

    def read(self, text: str):
        """text: the list's new text."""
        for ch in text:
            self._char(ch)

    def mark(self):
        """From here on `low` counts from the last boundary (the window moved to it)."""
        self.low = self._since

    def _char(self, ch: str):
        stack = self.stack
        empty, self._empty = self._empty, ""
        if self.in_comment:
            self.in_comment = ch not in "\r\n"
        elif stack and stack[-1][0] in QUOTES:
            self._in_string(ch)
        elif not stack and self._num_read:   # the list has closed
            self.bad = self.bad or not ch.isspace()
        elif ch == empty:   # "" then ": a triple-quoted string (its prefix, before the first quote, stays)
            stack.append(ch * 3)
            self.changes += 1
        elif ch in QUOTES or ch in CLOSER:
            if ch in QUOTES:
                self.before_quote, self._opened_at = self._previous, self._num_read
            stack.append(ch)
            self.changes += 1
            if len(stack) == 1:
                self.starts.append(self._num_read + 1)
            elif ch == "(" and len(stack) > 2:
                self._parens += 1
            elif ch in "[{" and len(stack) > 2:
                self._boundary(False)
        elif ch in ")]}":
            opened = stack.pop() if stack else None
            self.bad = self.bad or opened is None or CLOSER[opened] != ch
            self.changes += 1
            if opened == "(" and len(stack) >= 2:
                self._parens -= 1
            self.low, self._since = min(self.low, len(stack)), min(self._since, len(stack))
        elif ch == "," and len(stack) == 1:
            self.starts.append(self._num_read + 1)
        elif ch == "," and stack:
            self._boundary(True)
        elif ch == "#":
            self.in_comment = True
        self._previous = ch
        self._num_read += 1

    def _in_string(self, ch: str):
        quote = self.stack[-1]
        if self._escaped:
            self._escaped, self.quote_run = False, 0
        elif ch == "\\":
            self._escaped, self.quote_run = True, 0
        elif ch == quote[0]:
            self.quote_run += 1
            if self.quote_run == len(quote):
                self.stack.pop()
                self.changes += 1
                self.quote_run = 0
                if len(quote) == 1 and self._opened_at == self._num_read - 1:
                    self._empty = ch
        else:
            self.quote_run = 0

    def _boundary(self, has_elem: bool):
        if self._parens == 0 and self.stack[1] == "(":   # inside a call's arguments
            self.boundary = Boundary(self._num_read + 1, tuple(self.stack), has_elem, self.low)
            self._since = len(self.stack)


class Tail:
    """A text from a position on, in pieces: appended as it comes, its start dropped once it is not needed; its
    end read without joining the rest."""

    def __init__(self):
        self._pieces: deque[str] = deque()
        self._start = 0   # where the first piece starts in the whole text
        self.end = 0      # where the last one ends

    def append(self, text: str):
        self._pieces.append(text)
        self.end += len(text)

    def replace(self, text: str):
        """The whole text is this one now."""
        self._pieces.clear()
        self._start, self.end = 0, 0
        self.append(text)

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

    def text_from(self, at: int) -> str:
        """The text from position `at` (not before the start) to the end: the pieces it spans, joined."""
        parts, begin = [], self.end
        for piece in reversed(self._pieces):
            if begin <= at:
                break
            begin -= len(piece)
            parts.append(piece if begin >= at else piece[at - begin:])
        return "".join(reversed(parts))


class OpenString:
    """The string the open call's text ends in, once a completion parsed with it: what is added to it until its
    quote closes it is its JSON's continuation."""

    def __init__(self, call: int, quote: str, changes: int):
        self.call = call          # the call's index in the list
        self.quote = quote
        self.changes = changes    # the brackets' count of opened and closed when it was parsed
        self.pending = ""         # its text not decoded yet (an escape cut short)
