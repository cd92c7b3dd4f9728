"""Hermes-style tool calls (Qwen2.5, Qwen3, Hermes): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
anywhere in the text, any number of them; the text around them is content."""
from pagedllm.server.tool_parsers.base import DeltaMessage, ToolParser
from pagedllm.server.tool_parsers.json_call import CallScanner

START, END = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolParser):
    def __init__(self, max_calls: int | None = None):
        super().__init__(max_calls)
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
        if self._call is not None and not self._closing:
            self._close_call("")
        elif self._call is None:
            self._content(self._buf)
        self._buf = ""
        self._flush_content()
        return self._take()

    def _step(self) -> bool:
        """Places what it can of the buffer; True when it should be called again."""
        if self._closing:
            return self._skip_to_end()
        if self._call is not None:
            return self._read_body()
        i = self._buf.find(START)
        if i < 0:   # all but a possible start of a tag is content
            keep = _partial_suffix(self._buf, START)
            self._content(self._buf[:len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep:]
            return False
        self._content(self._buf[:i])
        self._buf = self._buf[i + len(START):]
        self._call, self._named = CallScanner("arguments"), False
        return True

    def _read_body(self) -> bool:
        call = self._call
        n = call.feed(self._buf)
        self._buf = self._buf[n:]
        end = call.text.find(END) if not call.in_string else -1
        if end >= 0 and not call.done:   # the tag closed a body that is not a whole object
            self._buf = call.text[end + len(END):] + self._buf
            call.text = call.text[:end]
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

    def _skip_to_end(self) -> bool:
        """After the object: whitespace (or stray text, dropped) up to END."""
        i = self._buf.find(END)
        if i < 0:
            keep = _partial_suffix(self._buf, END)
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
        self._end_call()


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of text that begins tag (it may complete in the next delta)."""
    for k in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0
