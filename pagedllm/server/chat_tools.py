"""Tool calling in chat completions (vLLM's semantics): what a request's tools and tool_choice make of its
sampling, and how each choice's text becomes content and tool calls, streamed or not.

- "none" (or no tools): the tools still reach the chat template; the text is plain content.
- "auto" (the default with tools): needs --enable-auto-tool-choice and a --tool-call-parser; the model's free
  text is read for calls by that parser.
- allowed_tools: its mode (auto or required) among only the tools it names, the only ones the template shows.
- "required" / a named function: enforced with structured output (forced.py's schemas), then read as calls.
parallel_tool_calls false allows one call: the schema's maxItems, or the parser drops the calls after the first.
finish_reason is "tool_calls" when a choice made calls and stopped on its own, except under a named function:
"stop" there, as OpenAI and vLLM answer a call the request forced by name.
"""
from dataclasses import dataclass

from pagedllm.outputs import CompletionOutput
from pagedllm.server.errors import APIError
from pagedllm.server.protocol import AllowedToolChoice, ChatCompletionRequest, NamedToolChoice
from pagedllm.server.tool_parsers import ToolParser, get_tool_parser
from pagedllm.server.tool_parsers.base import new_call_id
from pagedllm.server.tool_parsers.forced import (NamedCallParser, RequiredCallsParser, parameters_schema,
                                                 required_schema)
from pagedllm.structured_output.params import StructuredOutputsParams


@dataclass
class ToolPlan:
    choice: str                       # none, auto, required, named
    tools: list[dict]                 # OpenAI's shape, for the template
    name: str | None = None           # the named function
    parser: str | None = None         # --tool-call-parser: auto's parser, and the ids of every call
    max_calls: int | None = None      # parallel_tool_calls false: 1
    at: list[int] | None = None       # each tool's index in the request's tools (allowed_tools shows some)

    @property
    def parses(self) -> bool:
        return self.choice != "none"

    def structured_outputs(self) -> StructuredOutputsParams | None:
        if self.choice == "named":
            tool = next(t for t in self.tools if t["function"]["name"] == self.name)
            return StructuredOutputsParams(json=parameters_schema(tool), disable_any_whitespace=True)
        if self.choice == "required":
            return StructuredOutputsParams(json=required_schema(self.tools, self.max_calls is None),
                                           disable_any_whitespace=True)
        return None

    @property
    def keeps_special_tokens(self) -> bool:
        """The auto parser reads a special token (mistral's [TOOL_CALLS]): the text must keep them, as vLLM's
        mistral parser sets skip_special_tokens false."""
        return self.choice == "auto" and get_tool_parser(self.parser).reads_special_tokens

    def new_parser(self) -> ToolParser:
        # enforced calls take the configured parser's ids: a template that checks ids (mistral's) gets them back
        call_id = get_tool_parser(self.parser).call_id if self.parser else new_call_id
        if self.choice == "named":
            return NamedCallParser(self.name, call_id)
        if self.choice == "required":
            return RequiredCallsParser(self.max_calls, call_id)
        return get_tool_parser(self.parser).for_request(self.max_calls, self.tools)


def plan_tools(req: ChatCompletionRequest, tool_call_parser: str | None, enable_auto_tool_choice: bool) -> ToolPlan:
    at = req.shown_tools()
    tools = [req.tools[i].model_dump(exclude_none=True) for i in at]
    choice = req.tool_choice or ("auto" if tools else "none")
    if isinstance(choice, AllowedToolChoice):
        choice = choice.allowed_tools.mode
    max_calls = 1 if req.parallel_tool_calls is False else None
    if not tools or choice == "none":
        return ToolPlan("none", tools, at=at)
    if isinstance(choice, NamedToolChoice):
        return ToolPlan("named", tools, name=choice.function.name, parser=tool_call_parser, max_calls=1, at=at)
    if choice == "auto" and not (enable_auto_tool_choice and tool_call_parser):
        raise APIError(400, '"auto" tool choice (the default when tools are given) requires the server flags '
                            "--enable-auto-tool-choice and --tool-call-parser; or set tool_choice to none, "
                            "required or a named function", "tool_choice", "invalid_value")
    return ToolPlan(choice, tools, parser=tool_call_parser, max_calls=max_calls, at=at)


def message(plan: ToolPlan, c: CompletionOutput, text: str | None) -> tuple[dict, str | None]:
    """A non-streamed choice's message and finish_reason; text: c's text, or its content after reasoning
    (None: there is none)."""
    if not plan.parses:
        return {"role": "assistant", "content": text}, c.finish_reason
    parser = plan.new_parser()
    content, calls = parser.parse_all(text or "")
    if plan.choice in ("named", "required"):   # vLLM's message for a forced call: content or ""
        content = content or ""
    return {"role": "assistant", "content": content, "tool_calls": calls}, finish_reason(parser, len(calls), c)


def stream_delta(parser: ToolParser, c: CompletionOutput, text: str) -> tuple[dict, str | None]:
    """A streamed choice's delta for this output's text (what its parser could place) and finish_reason."""
    delta = parser.feed(text)
    if c.finish_reason is not None:
        delta.add(parser.finish())
    return delta.to_json(), finish_reason(parser, parser.num_calls, c)


def finish_reason(parser: ToolParser, num_calls: int, c: CompletionOutput) -> str | None:
    # a call forced by name keeps "stop" (OpenAI's and vLLM's): the client asked for it, the model chose nothing
    named = isinstance(parser, NamedCallParser)
    return "tool_calls" if num_calls and c.finish_reason == "stop" and not named else c.finish_reason
