"""Hermes-style tool calls (Qwen2.5, Qwen3, Hermes): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
anywhere in the text, any number of them; the text around them is content. The arguments may come under
"parameters" (Llama's key, which models of these families write too): dropped, the call would run without them.

Small models of these families often leave the tags out and answer a bare `{"name": ..., "arguments": ...}`
(Qwen2.5-Coder-0.5B does, at temperature 0, for its own template's tool prompt). Such an object is a call when
it opens the answer (or follows a call), has no keys but name and its arguments, and names one of the request's
tools; otherwise it is content. Its arguments come in one delta, once the object has closed.
"""
from pagedllm.server.tool_parsers.base import DeltaMessage, ToolParser, partial_suffix
from pagedllm.server.tool_parsers.json_call import CallScanner

START, END = "<tool_call>", "</tool_call>"
ARGS_KEYS = ("arguments", "parameters")   # models of this format write either (Llama-style "parameters")


class HermesToolParser(ToolParser):
    def __init__(self, max_calls: int | None = None, tool_names: tuple[str, ...] = ()):
        super().__init__(max_calls)
        self._tool_names = set(tool_names)
        self._bare: CallScanner | None = None  # a bare object that may be a call
        self._bare_ok = bool(tool_names)      # no content yet since the start or the last call
        self._buf = ""                        # text read but not yet placed
        self._call: CallScanner | None = None  # the body being read
        self._named = False                   # its name went out
        self._closing = False                 # its object closed: waiting for END

    def feed(self, text: str) -> DeltaMessage:
        self._buf += text
        while self._step():
            pass
        return self._take()

    def finish(self) -> DeltaMessage:
        if self._bare is not None:   # never closed: not a call
            self._content(self._bare.text + self._buf)
            self._bare, self._buf = None, ""
        if self._call is None:
            self._content(self._buf)
        else:   # cut short, or its object closed and the end tag never came (a stop string, the model's EOS)
            self._close_call("")
        self._buf = ""
        self._flush_content()
        return self._take()

    def _step(self) -> bool:
        """Places what it can of the buffer; True when it should be called again."""
        if self._closing:
            return self._skip_to_end()
        if self._call is not None:
            return self._read_body()
        if self._bare is not None or self._bare_ok:
            return self._read_bare()
        i = self._buf.find(START)
        if i < 0:   # all but a possible start of a tag is content
            keep = partial_suffix(self._buf, START)
            self._content(self._buf[:len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep:]
            return False
        self._content(self._buf[:i])
        self._buf = self._buf[i + len(START):]
        self._call, self._named = CallScanner(ARGS_KEYS, END), False
        return True

    def _read_body(self) -> bool:
        call = self._call
        n = call.feed(self._buf)
        self._buf = self._buf[n:]
        if call.stopped:   # the tag closed a body that is not a whole object (not a tag inside a string)
            call.text = call.text[:-len(END)]
            self._close_call(END)
            return True
        if call.name is not None and not self._named:
            self._start_call(call.name)
            self._named = True
        if self._named:
            self._arguments(call.take_arguments())
        if call.done:
            self._closing = True
            return True
        return False

    def _read_bare(self) -> bool:
        if self._bare is None:
            text = self._buf.lstrip()
            if not text:
                return False
            self._bare_ok = text[0] == "{"
            if not self._bare_ok:
                return True
            self._buf, self._bare = text, CallScanner(ARGS_KEYS)
        n = self._bare.feed(self._buf)
        self._buf = self._buf[n:]
        if not self._bare.done:
            return False
        call, self._bare = self._bare, None
        if call.name in self._tool_names and set(call.keys) <= {"name", *ARGS_KEYS}:
            self._start_call(call.name)
            self._arguments(call.take_arguments())
            self._end_call()
            self._bare_ok = True
        else:
            self._content(call.text)
        return True

    def _content(self, text: str):
        if text.strip():
            self._bare_ok = False
        super()._content(text)

    def _skip_to_end(self) -> bool:
        """After the object: whitespace (or stray text, dropped) up to END."""
        i = self._buf.find(END)
        if i < 0:
            keep = partial_suffix(self._buf, END)
            self._buf = self._buf[len(self._buf) - keep:]
            return False
        self._buf = self._buf[i + len(END):]
        self._close_call(END)
        return True

    def _close_call(self, end: str):
        """end: the tag that closed it ("" when the text ended first)."""
        call, self._call, self._closing = self._call, None, False
        if call.name is None and not self._named:   # no function named: the text was content after all
            self._content(START + call.text + end)
            return
        if not self._named:
            self._start_call(call.name)
        self._arguments(call.take_arguments())
        self._end_call(cut=not end and not call.done)
        self._bare_ok = bool(self._tool_names)
