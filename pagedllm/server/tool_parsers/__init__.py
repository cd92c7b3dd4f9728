"""Tool-call parsers by name (`--tool-call-parser NAME`, vLLM's flag): each reads a model's free text
(tool_choice "auto") into content and OpenAI-shaped tool calls, streamed or not. The parsers of enforced
calls (tool_choice "required" or a named function) are in forced.py; base.py has the shared shapes."""
from pagedllm.server.tool_parsers.base import DeltaMessage, ToolCallDelta, ToolParser
from pagedllm.server.tool_parsers.hermes import HermesToolParser
from pagedllm.server.tool_parsers.llama3_json import Llama3JsonToolParser
from pagedllm.server.tool_parsers.mistral import MistralToolParser
from pagedllm.server.tool_parsers.pythonic import Llama4PythonicToolParser, PythonicToolParser
from pagedllm.server.tool_parsers.qwen3_coder import Qwen3CoderToolParser

# name -> the parser's class; a choice's parser is made by its for_request(max_calls, tools)
TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
    "mistral": MistralToolParser,
    "pythonic": PythonicToolParser,
    "llama4_pythonic": Llama4PythonicToolParser,
    "qwen3_coder": Qwen3CoderToolParser,
}


def get_tool_parser(name: str) -> type[ToolParser]:
    if name not in TOOL_PARSERS:
        raise ValueError(f"tool_call_parser must be one of {sorted(TOOL_PARSERS)}, got {name!r}")
    return TOOL_PARSERS[name]


__all__ = ["TOOL_PARSERS", "DeltaMessage", "ToolCallDelta", "ToolParser", "get_tool_parser"]
