"""Llama 3.1/3.2/3.3 JSON tool calls (`--tool-call-parser llama3_json`, vLLM's name): the model answers a call
as its chat template asks, `{"name": function name, "parameters": {...}}` ("arguments" is read too), several of
them separated by ";" (vLLM's "; ", also ";\n" or only whitespace), after `<|python_tag|>` when the model wrote
that token and skip_special_tokens is false (the tag is dropped).

An object is a call when it has a string "name" and an arguments key; other keys (Llama 3.2/3.3 add "type") are
ignored. Any other object (`{"name": "Ada", "age": 36}`, JSON that answers the question) stays content, as in
vLLM. A call may follow text, as vLLM finds it there, and the text around calls is content (vLLM drops it).
A call goes out once its name and its arguments key are read; the arguments then stream as the model writes
them. Objects that are not calls are held back until they close (or the text ends).
"""
from pagedllm.server.tool_parsers.base import DeltaMessage, ToolParser, partial_suffix
from pagedllm.server.tool_parsers.json_call import CallScanner

PYTHON_TAG = "<|python_tag|>"
ARGS_KEYS = ("parameters", "arguments")


class Llama3JsonToolParser(ToolParser):
    def __init__(self, max_calls: int | None = None, tool_names: tuple[str, ...] = ()):
        # tool_names: not checked, as in vLLM: a call may name any function
        super().__init__(max_calls)
        self._buf = ""                          # text read but not yet placed
        self._obj: CallScanner | None = None    # the object being read
        self._calling = False                   # it went out as a call
        self._after_call = False                # a call just ended: one ";" before the next is a separator

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
        if self._after_call:
            rest = self._buf.lstrip()
            if not rest:
                return False
            self._after_call = False
            if rest[0] == ";":
                self._buf = rest[1:]
            return True
        i = self._buf.find("{")
        if i < 0:   # all but a possible start of the tag is content
            i = len(self._buf) - partial_suffix(self._buf, PYTHON_TAG)
        self._content(self._buf[:i].replace(PYTHON_TAG, ""))
        self._buf = self._buf[i:]
        if not self._buf.startswith("{"):
            return False
        self._obj, self._calling = CallScanner(ARGS_KEYS), False
        return True

    def _read_object(self) -> bool:
        obj = self._obj
        n = obj.feed(self._buf)
        self._buf = self._buf[n:]
        if not self._calling and obj.name is not None and any(k in ARGS_KEYS for k in obj.keys):
            self._start_call(obj.name)
            self._calling = True
        if self._calling:
            self._arguments(obj.take_arguments())
        if not obj.done:
            return False
        self._end_object()
        return True

    def _end_object(self):
        obj, self._obj = self._obj, None
        if not self._calling:
            self._content(obj.text)
            return
        self._arguments(obj.take_arguments())
        self._end_call()
        self._after_call = True
