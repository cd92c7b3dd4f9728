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
taken back) and drops the object when streamed. A later item that is a JSON scalar (`[{call}, 42]`) is wrapping
too, as in vLLM, which reads objects only and answers that list with the call and no content (not streamed: its
stream answers any text that opens with "[" as content, lists of calls too; here streamed equals non-streamed).
"""
import re

from pagedllm.server.tool_parsers.base import DeltaMessage, ToolParser, partial_suffix
from pagedllm.server.tool_parsers.json_call import CallScanner

PYTHON_TAG = "<|python_tag|>"
ARGS_KEYS = ("parameters", "arguments")
FENCE = "```"
OPENER = re.compile(r"(?:```(?:json)?\s*)?(?:\[\s*)?\Z")   # what wraps a first call: a fence, a list, both
# the start of an opener, which the next text may complete
PARTIAL_OPENER = re.compile(r"(?:`{1,2}|```(?:j|js|jso|json)?\s*(?:\[\s*)?|\[\s*)?\Z")
# a later item of a list of calls that is a JSON scalar (a number, a string, true, false, null), with its comma
SCALAR_ITEM = re.compile(r',\s*(?:-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?|"(?:[^"\\]|\\.)*"|true|false|null)'
                         r"\s*(?=[,\]])")
# the start of one, which the next text may complete
PARTIAL_SCALAR_ITEM = re.compile(r',\s*(?:-?[\d.eE+-]*|"(?:[^"\\]|\\.)*(?:\\|")?|[tfn][a-z]{0,4})\s*\Z')


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
        self._wraps = (False, False)            # (in a list, in a fence) if the object is a call
        self._in_list = self._fenced = False    # the calls so far are wrapped: their closers are dropped

    def feed(self, text: str) -> DeltaMessage:
        self._buf += text
        while self._step():
            pass
        return self._take()

    def finish(self) -> DeltaMessage:
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
        i = self._buf.find("{")
        if i < 0:   # all but a possible start of the tag or of an opener is content
            held = max(partial_suffix(self._buf, PYTHON_TAG), len(PARTIAL_OPENER.search(self._buf).group()))
            self._content(self._buf[:len(self._buf) - held].replace(PYTHON_TAG, ""))
            self._buf = self._buf[len(self._buf) - held:]
            return False
        prefix = OPENER.search(self._buf, 0, i).group()
        self._content(self._buf[:i - len(prefix)].replace(PYTHON_TAG, ""))
        self._open(prefix, ("[" in prefix, FENCE in prefix), i)
        return True

    def _open(self, prefix: str, wraps: tuple[bool, bool], at: int):
        self._obj, self._calling, self._prefix, self._wraps = CallScanner(ARGS_KEYS), False, prefix, wraps
        self._buf = self._buf[at:]

    def _read_after(self) -> bool:
        """After a call: a ";" separates the next, and so does a "," before a "{"; in a list "]" ends it; a fence
        ends with ```, and the objects in it before that are its calls (separated as anywhere).
        After an item of a list (or fence) of calls that is no call, only the wrapping is read."""
        rest = self._buf.lstrip()
        if not rest:
            return False
        if self._in_list and rest[0] == "," and not self._sep:
            after = rest[1:].lstrip()
            if not after:
                return False
            if after[0] == "{":   # the list's next item
                self._after = None
                self._open(rest[:len(rest) - len(after)], (True, self._fenced), len(self._buf) - len(after))
                return True
            scalar = SCALAR_ITEM.match(rest)
            if scalar:   # wrapping too: vLLM reads the objects only, and answers [{call}, 42] with the call alone
                self._buf = rest[scalar.end():]
                return True
            if PARTIAL_SCALAR_ITEM.match(rest):
                return False
        if self._in_list and rest[0] == "]":
            self._in_list, self._buf = False, rest[1:]
            return True
        fenced = self._fenced and not self._in_list
        if fenced:
            if len(rest) < len(FENCE) and FENCE.startswith(rest):   # the fence's end may come next
                return False
            if rest.startswith(FENCE):
                self._fenced, self._sep, self._buf = False, False, rest[3:]
                return True
            if rest[0] == "{":   # the fence's next object
                self._after, self._sep = None, False
                self._open("", (False, True), len(self._buf) - len(rest))
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
        self._after, self._sep, self._in_list, self._fenced = None, False, False, False
        if separator:
            self._buf = rest[1:]
        return True

    def _read_object(self) -> bool:
        obj = self._obj
        n = obj.feed(self._buf)
        self._buf = self._buf[n:]
        if not self._calling and obj.name is not None and any(k in ARGS_KEYS for k in obj.keys):
            self._start_call(obj.name)
            self._calling, self._prefix = True, ""
            self._in_list, self._fenced = self._wraps
        if self._calling:
            self._arguments(obj.take_arguments())
        if not obj.done:
            return False
        self._end_object()
        return True

    def _end_object(self):
        obj, self._obj = self._obj, None
        if not self._calling and (self._in_list or self._fenced):
            # an item of a list of calls that is no call: it is content (text the model wrote), while the list's
            # "," before it and its "]" stay the calls' wrapping (vLLM answers such a list all as content, but only
            # when not streamed: a call that went out cannot be taken back, and its stream drops the object); so
            # in a fence that a call opened
            self._content(obj.text)
            self._prefix, self._after = "", "item"
            return
        if not self._calling:   # not a call: its wrapping is content too
            self._content(self._prefix + obj.text)
            self._prefix, self._in_list, self._fenced = "", False, False
            return
        self._arguments(obj.take_arguments())
        self._end_call()
        self._after = "call"
