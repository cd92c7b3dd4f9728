"""Mistral tool calls (Mistral-7B-Instruct-v0.3, Mistral-Nemo, Mistral-Small): the special token [TOOL_CALLS],
then either a JSON list `[{"name": ..., "arguments": {...}}, ...]` (tokenizers before v11), or, from v11 on, the
function's name, `[ARGS]` (HF tokenizers write it) and its arguments object, the token repeated before each
call; a tokenizer with the [CALL_ID] token may write it and the call's id between the name and [ARGS]. Text
before the first [TOOL_CALLS] is content. The text between the token and the first "{" tells the format (vLLM
asks the tokenizer instead): a "[" ending it opens a list, nothing at all is a lone call object
(`{"name": ..., "arguments": ...}`), anything else is a name; so one parser reads both, whatever the version.

The server keeps special tokens in the text for this parser (`reads_special_tokens`): skipped, [TOOL_CALLS]
would be gone and the calls would read as content. Call ids are 9 letters and digits (vLLM's for Mistral):
Mistral's chat templates refuse any other id when the conversation comes back. An id the model wrote after
[CALL_ID] is the call's when it is such an id (and no other call of the answer has it), else one is made.

A v11 call's arguments are the text up to the next [TOOL_CALLS] or the end (vLLM's split), released as it
comes; a list's items are read with the JSON call scanner, and text after the list is content. A [TOOL_CALLS]
followed by no call (no "{" came, or no item's name completed) gives its text back as content.
"""
import secrets
import string

from pagedllm.server.tool_parsers.base import DeltaMessage, ToolParser, partial_suffix
from pagedllm.server.tool_parsers.json_call import CallScanner

BOT, ARGS, CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"
_ID_CHARS = string.ascii_letters + string.digits


def mistral_call_id() -> str:
    return "".join(secrets.choice(_ID_CHARS) for _ in range(9))


class MistralToolParser(ToolParser):
    call_id = staticmethod(mistral_call_id)
    reads_special_tokens = True

    def __init__(self, max_calls: int | None = None, tool_names: tuple[str, ...] = ()):
        super().__init__(max_calls)   # tool_names: not needed, the token marks every call
        self._buf = ""         # text not yet read: it may end in part of BOT
        self._state = "content"   # content, head (before the first "{"), args (v11), list, object, after
        self._section: list[str] = []   # text since the last BOT, until a call starts: content if none does
        self._head: list[str] = []      # the head's text read so far (no "{" in it)
        self._called = False   # this section started a call
        self._item: CallScanner | None = None   # the list's item (or the lone object) being read
        self._named = False    # its name went out
        self._ws: list[str] = []   # v11 arguments' trailing whitespace, released with the next other character
        self._ids: set[str] = set()   # the ids of the calls out

    def feed(self, text: str) -> DeltaMessage:
        self._buf += text
        while (i := self._buf.find(BOT)) >= 0:
            self._read(self._buf[:i])
            self._end_section()
            self._buf = self._buf[i + len(BOT):]
            self._state, self._section, self._head, self._called = "head", [], [], False
        keep = partial_suffix(self._buf, BOT)
        self._read(self._buf[:len(self._buf) - keep])
        self._buf = self._buf[len(self._buf) - keep:]
        return self._take()

    def finish(self) -> DeltaMessage:
        self._read(self._buf)
        self._buf = ""
        self._end_section()
        self._flush_content()
        return self._take()

    def _read(self, text: str):
        if self._state in ("content", "after"):
            self._content(text)
            return
        if not self._called:   # (each piece kept once: a long section is never copied again)
            self._section.append(text)
        if self._state == "head":
            self._read_head(text)
        elif self._state == "args":
            self._read_args(text)
        else:
            self._read_items(text)

    def _read_head(self, text: str):
        """Up to the first "{": "[" before it opens a list, nothing before it a lone call object, else a name."""
        i = text.find("{")
        if i < 0:
            self._head.append(text)
            return
        head, rest, self._head = "".join(self._head) + text[:i], text[i:], []
        if head.rstrip().endswith("["):   # anything before the "[" is dropped (vLLM finds the list anyway)
            self._state = "list"
        elif not head.strip():
            self._state = "object"
        else:
            self._state, self._ws, self._called = "args", [], True
            name, _, written = head.replace(ARGS, "").partition(CALL_ID)
            self._start_call(name.strip(), self._call_id(written.strip()))
            self._read_args(rest)
            return
        self._read_items(rest)

    def _call_id(self, written: str) -> str:
        """The call's id: the one the model wrote after [CALL_ID] when it is 9 ASCII letters and digits, not yet
        given to a call of this answer. Any other is replaced by a new one: Mistral's chat templates (and
        mistral_common's validator) refuse the conversation back with it, and two calls sharing an id could not
        be told apart by their tool results."""
        if not (len(written) == 9 and all(c in _ID_CHARS for c in written) and written not in self._ids):
            written = mistral_call_id()
        self._ids.add(written)
        return written

    def _read_args(self, text: str):
        kept = text.rstrip()
        if not kept:
            self._ws.append(text)
            return
        self._arguments("".join(self._ws) + kept)
        self._ws = [text[len(kept):]]

    def _read_items(self, text: str):
        while text and self._state in ("list", "object"):
            if self._item is None:
                ch = text[0]
                if ch == "{":
                    self._item, self._named = CallScanner(("arguments",)), False
                    continue
                if ch == "]" and self._state == "list":
                    self._state = "after"
                    self._content(text[1:])
                    return
                text = text[1:]   # commas and whitespace between items
                continue
            text = text[self._item.feed(text):]
            if self._item.name is not None and not self._named:
                self._start_call(self._item.name)
                self._named = self._called = True
            if self._named:
                self._arguments(self._item.take_arguments())
            if self._item.done:
                self._end_item()
                if self._state == "object":
                    self._state = "after"
                    self._content(text)
                    return

    def _end_item(self):
        if self._named:
            self._arguments(self._item.take_arguments())
            self._end_call(cut=not self._item.done)
        self._item = None

    def _end_section(self):
        if self._state == "args":
            self._ws = []
            self._end_call()
        elif self._state in ("list", "object") and self._item is not None:
            self._end_item()
        if self._state in ("head", "list", "object") and not self._called:
            self._content("".join(self._section).lstrip())
