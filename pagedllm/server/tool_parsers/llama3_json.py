"""Llama 3.1/3.2/3.3 JSON tool calls (`--tool-call-parser llama3_json`, vLLM's name): the model answers a call
as its chat template asks, `{"name": function name, "parameters": {...}}` ("arguments" is read too), several of
them separated by ";" (vLLM's "; ", also ";\n" or only whitespace) or "," (a list without its brackets, which
vLLM's streaming reads too), after `<|python_tag|>` when the model wrote that token and skip_special_tokens is false
(the tag is dropped).

An object is a call when it has a string "name" and an arguments key; other keys (Llama 3.2/3.3 add "type") are
ignored. Any other object (`{"name": "Ada", "age": 36}`, JSON that answers the question) stays content, as in
vLLM. A call may follow text, as vLLM finds it there, and the text around calls is content (vLLM drops it).
A call goes out once its name and its arguments key are read; the arguments then stream as the model writes
them. Objects that are not calls are held back until they close (or the text ends).

Llama 3.x also writes its calls as a JSON list (`[{...}, {...}]`) or in a ```json code fence; the list's
brackets and commas and the fence are the calls' wrapping, not content (vLLM, which takes every call object
out of the text, answers such text with the calls and no content). A "[" or fence before an object is held
with it: dropped when the object is a call, given back as content when it is not. A later item of a list that
opened with a call is content when it is no call (`[{call}, {"foo": 1}]` answers `{"foo": 1}`), the list's commas
and "]" still its wrapping: vLLM answers such a list all as content when not streamed (a streamed call cannot be
taken back) and drops the object when streamed. An item that is no object, a JSON scalar or a list of them, before
the first call or after it (`[42, {call}, [1, [2]]]`), and lists nested around calls (`[[{call}]]`), are wrapping
too, as in vLLM, which reads objects only and answers such a list with its calls and no content (not streamed: its
stream answers any text that opens with "[" as content, lists of calls too; here streamed equals non-streamed).
A list that closes or breaks off before any object is text.
"""
import re

from pagedllm.server.tool_parsers.base import DeltaMessage, ToolParser, partial_suffix
from pagedllm.server.tool_parsers.json_call import CallScanner
from pagedllm.server.tool_parsers.json_list import ListScan, moved, scan_list, start_list

PYTHON_TAG = "<|python_tag|>"
ARGS_KEYS = ("parameters", "arguments")
FENCE = "```"
OBJECT_OR_LIST = re.compile(r"[\[{]")
NON_SPACE = re.compile(r"\S")
FENCE_OPENER = re.compile(r"(?:```(?:json)?\s*)?\Z")   # a fence before a first call or its list
# the start of an opener, which the next text may complete
PARTIAL_OPENER = re.compile(r"(?:`{1,2}|```(?:j|js|jso|json)?\s*(?:\[\s*)?|\[\s*)?\Z")


class Llama3JsonToolParser(ToolParser):
    def __init__(self, max_calls: int | None = None, tool_names: tuple[str, ...] = ()):
        # tool_names: not checked, as in vLLM: a call may name any function
        super().__init__(max_calls)
        self._buf = ""                          # text read but not yet placed
        self._obj: CallScanner | None = None    # the object being read
        self._calling = False                   # it went out as a call
        self._after: str | None = None          # "call" or "item" (no call, in a list of calls) just ended
        self._sep = False                       # a separator after it was read (in a fence: the fence goes on)
        self._prefix = ""                       # the object's wrapping ("[", a fence, ", " in a list): held
        self._wraps = (0, False)                # (lists open, in a fence) if the object is a call
        self._depth = 0                         # lists open around the calls so far: their closers are dropped
        self._fenced = False                    # the calls so far are in a fence
        # a list scan that stopped for more text: (after a call, where, the scan), where being the "[" of a list
        # that may yet wrap a call, or the start of a list's text after a call; it goes on when the buffer grew
        self._resume: tuple[bool, int, ListScan] | None = None
        # while it waits, the text after the buffer (joined once the list shows what it is, so that a long one is
        # not copied at each delta), and the text from where the scan stopped (a number cut short) on
        self._pending: list[str] = []
        self._carry: str | None = None

    def feed(self, text: str) -> DeltaMessage:
        if self._resume is not None and self._still_more(text):
            return self._take()
        self._buf += text
        while self._step():
            pass
        return self._take()

    def _still_more(self, text: str) -> bool:
        """A list scan that waits reads the new text alone: True while it waits still (the text is kept aside);
        else the text kept is joined to the buffer, whose scan goes on where it stopped."""
        after_call, where, state = self._resume
        if self._carry is None:
            self._carry = self._buf[state.end:]
        local = self._carry + text
        scan = scan_list(local, moved(state, 0))
        if scan.kind != "more":
            self._buf += "".join(self._pending)
            self._pending.clear()
            self._carry = None
            return False
        self._pending.append(text)
        self._resume, self._carry = (after_call, where, moved(scan, state.end + scan.end)), local[scan.end:]
        return True

    def finish(self) -> DeltaMessage:
        self._buf += "".join(self._pending)
        if self._obj is not None:   # never closed (max_tokens, a stop string): a call keeps what it has
            self._end_object()
        self._content(self._buf)
        self._buf = ""
        self._flush_content()
        return self._take()

    def _step(self) -> bool:
        """Places what it can of the buffer; True when it should be called again."""
        if self._obj is not None:
            return self._read_object()
        if self._after is not None:
            return self._read_after()
        i, depth, held = self._first_object()
        if i < 0:   # all but a list that may yet hold a call, or a possible start of the tag or of an opener
            if not held:   # (a list held runs to the end: it holds those)
                held = max(partial_suffix(self._buf, PYTHON_TAG), len(PARTIAL_OPENER.search(self._buf).group()))
            cut = len(self._buf) - held
            self._content(self._buf[:cut].replace(PYTHON_TAG, ""))
            self._buf = self._buf[cut:]
            if self._resume is not None:   # (_first_object's: a list that may yet wrap a first call)
                _, where, scan = self._resume
                self._resume = (False, where - cut, moved(scan, scan.end - cut))
            return False
        prefix = FENCE_OPENER.search(self._buf, 0, i - held).group() + self._buf[i - held:i]
        self._content(self._buf[:i - len(prefix)].replace(PYTHON_TAG, ""))
        self._open(prefix, (depth, FENCE in prefix), i)
        return True

    def _first_object(self) -> tuple[int, int, int]:
        """(where the first object starts or -1, the lists open around it, how much before it is their
        wrapping); with no object: (-1, 0, the length of a list at the end that may yet hold one).
        A list wraps an object after any items that are no objects ([42, [1, 2], {...}), at any depth."""
        at, resume, self._resume = 0, self._resume, None
        while (m := OBJECT_OR_LIST.search(self._buf, at)) is not None:
            start = m.start()
            if m.group() == "{":
                return start, 0, 0
            resumed = resume is not None and resume[:2] == (False, start)
            scan = scan_list(self._buf, resume[2] if resumed else start_list(start))
            if scan.kind == "object":
                return scan.end, scan.depth, scan.end - start
            if scan.kind == "more":   # nothing after it is read: it holds no object yet (held with its fence)
                self._resume, self._carry = (False, start, scan), None
                return -1, 0, len(self._buf) - start + len(FENCE_OPENER.search(self._buf, 0, start).group())
            # a list that closed is text (a "{" in its strings too); one that broke off may hold a list that wraps
            at = scan.end if scan.kind == "closed" else start + 1
        return -1, 0, 0

    def _open(self, prefix: str, wraps: tuple[bool, bool], at: int):
        self._obj, self._calling, self._prefix, self._wraps = CallScanner(ARGS_KEYS), False, prefix, wraps
        self._buf = self._buf[at:]

    def _read_after(self) -> bool:
        """After a call: a ";" separates the next, and so does a "," before a "{"; in a list "]" ends it; a fence
        ends with ```, and the objects in it before that are its calls (separated as anywhere).
        After an item of a list (or fence) of calls that is no call, only the wrapping is read."""
        first = NON_SPACE.search(self._buf)
        if first is None:
            return False
        if self._depth and self._buf[first.start()] in ",]":
            placed = self._read_list(first.start())
            if placed is not None:
                return placed
        rest = self._buf[first.start():]
        fenced = self._fenced and not self._depth
        if fenced:
            if len(rest) < len(FENCE) and FENCE.startswith(rest):   # the fence's end may come next
                return False
            if rest.startswith(FENCE):
                self._fenced, self._sep, self._buf = False, False, rest[3:]
                return True
            if rest[0] == "{":   # the fence's next object
                self._after, self._sep = None, False
                self._open("", (0, True), len(self._buf) - len(rest))
                return True
        separator = rest[0] == ";" and not self._sep
        if rest[0] == "," and (self._after == "call" or fenced) and not self._sep:   # "{call}, {call}" (a list
            after = rest[1:].lstrip()                                                   # without brackets): as ";"
            if not after:
                return False
            separator = after[0] == "{"   # else the comma is text ("{call}, which ...")
        separator = separator and (self._after == "call" or fenced)
        if separator and fenced:   # what follows tells whether the fence goes on
            self._buf, self._sep = rest[1:], True
            return True
        self._after, self._sep, self._depth, self._fenced = None, False, 0, False
        if separator:
            self._buf = rest[1:]
        return True

    def _read_list(self, at: int) -> bool | None:
        """The list of calls goes on at `at`: items that are no objects (42, [1, [2]]) and its brackets are
        wrapping too, as vLLM reads the objects only; an object (at any depth) is the next item. None where text
        breaks the list off (", 42 is it"): that is content from its comma on."""
        resume, self._resume = self._resume, None
        resumed = resume is not None and resume[:2] == (True, at)
        scan = scan_list(self._buf, resume[2] if resumed else ListScan("more", at, self._depth, False))
        if scan.kind == "more":
            self._resume, self._carry = (True, at, scan), None
            return False
        if scan.kind == "object":
            self._after = None
            self._open(self._buf[at:scan.end], (scan.depth, self._fenced), scan.end)
            return True
        if scan.kind == "closed":
            self._depth, self._buf = 0, self._buf[scan.end:]
            return True
        return None

    def _read_object(self) -> bool:
        obj = self._obj
        n = obj.feed(self._buf)
        self._buf = self._buf[n:]
        if not self._calling and obj.name is not None and any(k in ARGS_KEYS for k in obj.keys):
            self._start_call(obj.name)
            self._calling, self._prefix = True, ""
            self._depth, self._fenced = self._wraps
        if self._calling:
            self._arguments(obj.take_arguments())
        if not obj.done:
            return False
        self._end_object()
        return True

    def _end_object(self):
        obj, self._obj = self._obj, None
        if not self._calling and (self._depth or self._fenced):
            # an item of a list of calls that is no call: it is content (text the model wrote), while the list's
            # "," before it and its "]" stay the calls' wrapping (vLLM answers such a list all as content, but only
            # when not streamed: a call that went out cannot be taken back, and its stream drops the object); so
            # in a fence that a call opened
            self._content(obj.text)
            self._prefix, self._after = "", "item"
            return
        if not self._calling:   # not a call: its wrapping is content too
            self._content(self._prefix + obj.text)
            self._prefix, self._depth, self._fenced = "", 0, False
            return
        self._arguments(obj.take_arguments())
        self._end_call(cut=not obj.done)
        self._after = "call"
