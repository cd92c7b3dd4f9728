"""Tool calls the engine enforces with structured output (tool_choice "required" or a named function): the
JSON schema each one constrains the output to, and the parsers that read that output as calls.

- named function: the output is the arguments object itself (the function's `parameters` schema);
- required: the output is [{"name": ..., "parameters": {...}}, ...] (at least one call; at most one when
  parallel_tool_calls is false), each item one of the tools.
The JSON is generated without free whitespace (single spaces only, StructuredOutputsParams'
disable_any_whitespace): with it a weak model can spend all of max_tokens on newlines inside the object.
Each parser takes call_id, the configured --tool-call-parser's id maker (mistral's 9 letters and digits, as vLLM
gives forced calls with a Mistral tokenizer), so an enforced call's id passes the model's chat template too.
"""
from pagedllm.server.tool_parsers.base import DeltaMessage, ToolParser, new_call_id
from pagedllm.server.tool_parsers.json_call import CallScanner

# A function declared without parameters takes none (OpenAI's reading): its arguments are {}.
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


def parameters_schema(tool: dict) -> dict:
    return tool["function"].get("parameters") or NO_PARAMETERS


def required_schema(tools: list[dict], parallel_tool_calls: bool) -> dict:
    items = [{"type": "object",
              "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                             "parameters": parameters_schema(t)},
              "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
    schema = {"type": "array", "minItems": 1, "items": items[0] if len(items) == 1 else {"anyOf": items}}
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    return schema


class NamedCallParser(ToolParser):
    """The whole output is the arguments of one call to `name`. An output without any (the reasoning took all
    of max_tokens, or ended the answer: the constraint starts after it) is no call, not a call with "{}"."""

    def __init__(self, name: str, call_id=new_call_id):
        super().__init__()
        self.call_id = call_id
        self._name = name
        self._started = False
        self._ws = ""   # whitespace, released with the next other character (none at either end)

    def feed(self, text: str) -> DeltaMessage:
        text = self._ws + text
        if not self._args_len:   # nothing out yet: leading whitespace is not part of the arguments
            text = text.lstrip()
        kept = text.rstrip()
        self._ws = text[len(kept):]
        if kept and not self._started:
            self._start_call(self._name)
            self._started = True
        self._arguments(kept)
        return self._take()

    def finish(self) -> DeltaMessage:
        if self._started:
            self._end_call()
        return self._take()


class RequiredCallsParser(ToolParser):
    """[{"name": ..., "parameters": ...}, ...]: each item a call as soon as its name is complete. Output cut short
    before a name holds no call and is no content either: it is the constraint's JSON, not text the model chose
    to say (the message's content is "" then, as vLLM 0.26's `content or ""` under a forced choice)."""

    def __init__(self, max_calls: int | None = None, call_id=new_call_id):
        super().__init__(max_calls)
        self.call_id = call_id
        self._opened = False
        self._closed = False
        self._call: CallScanner | None = None
        self._named = False

    def feed(self, text: str) -> DeltaMessage:
        while text and not self._closed:
            text = self._read(text)
        return self._take()

    def finish(self) -> DeltaMessage:
        if self._call is not None and self._call.name is not None:
            self._end_item()
        return self._take()

    def _read(self, text: str) -> str:
        if self._call is not None:
            n = self._call.feed(text)
            if self._call.name is not None and not self._named:
                self._start_call(self._call.name)
                self._named = True
            if self._named:
                self._arguments(self._call.take_arguments())
            if self._call.done:
                self._end_item()
            return text[n:]
        ch, rest = text[0], text[1:]
        if not self._opened:
            self._opened = ch == "["
        elif ch == "{":
            self._call, self._named = CallScanner(("parameters",)), False
            return text
        elif ch == "]":
            self._closed = True
        return rest

    def _end_item(self):
        if self._named:
            self._arguments(self._call.take_arguments())
            self._end_call(cut=not self._call.done)
        self._call = None
