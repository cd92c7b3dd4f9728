"""The body of POST /v1/responses (OpenAI's Responses API): its input items, tools and settings, each
honoured (responses_input.py makes them a chat request), a documented no-op or a 400 naming the field.

conversation, prompt, include's other values (but reasoning.encrypted_content and message.output_text.logprobs,
below), truncation auto, max_tool_calls and reasoning.summary are a 400 naming the field, as are tools other than
functions and input other than text. No-ops: metadata (echoed), user, service_tier (OpenAI's tiers, echoed),
safety_identifier, prompt_cache_key, prompt_cache_retention, stream_options (its include_obfuscation). vLLM's
additions pass to the chat request as they are: top_k, seed, stop, logit_bias, presence / frequency / repetition
penalties, ignore_eos, skip_special_tokens, include_stop_str_in_output, structured_outputs, include_reasoning,
chat_template_kwargs, priority, cache_salt; request_id names the response (its id, as sent: vLLM's).
"""
import base64
from typing import Any, Literal

from pydantic import Field, model_validator

from pagedllm.server.errors import APIError
from pagedllm.server.protocol import PromptCacheRetention, _Request, _Strict, check_tools, fields_of_its_type


class ContentPart(_Strict):
    type: Literal["input_text", "output_text", "reasoning_text", "input_image", "input_file", "refusal"]
    text: str | None = None
    annotations: list[Any] | None = None    # output_text sent back: a no-op
    logprobs: list[Any] | None = None
    image_url: str | None = None
    file_id: str | None = None
    detail: str | None = None

    @model_validator(mode="after")
    def _own_fields(self):   # non-text parts are refused where they are read (_texts)
        return fields_of_its_type(self, {"input_text": ("text",), "output_text": ("text", "annotations", "logprobs"),
                                         "reasoning_text": ("text",)}, "a content part")


class SummaryPart(_Strict):
    type: Literal["summary_text"]
    text: str


class InputItem(_Strict):
    type: Literal["message", "function_call", "function_call_output", "reasoning", "item_reference"] | None = None
    role: Literal["user", "system", "developer", "assistant"] | None = None
    content: str | list[ContentPart] | None = None
    id: str | None = None
    status: str | None = None
    call_id: str | None = None              # function_call, function_call_output
    name: str | None = None
    arguments: str | None = None
    output: str | list[ContentPart] | None = None
    summary: list[SummaryPart] | None = None    # reasoning
    encrypted_content: str | None = None
    # OpenAI's label on an assistant message (newer outputs carry it, null too): which turn of an agent's work it
    # was. The chat templates served here have no place for it, so it is taken and dropped, as vLLM drops it; the
    # output items carry none (responses_output._message_item says why).
    phase: Literal["commentary", "final_answer"] | None = None

    @model_validator(mode="after")
    def _own_fields(self):
        message = ("role", "content", "id", "status", "phase")
        return fields_of_its_type(self, {
            None: message, "message": message,
            "function_call": ("call_id", "name", "arguments", "id", "status"),
            "function_call_output": ("call_id", "output", "id", "status"),
            "reasoning": ("summary", "encrypted_content", "content", "id", "status"),
            "item_reference": ("id",)}, "an input item")


class FunctionTool(_Strict):
    type: Literal["function"]
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoice(_Strict):
    type: Literal["function"]
    name: str


class AllowedTools(_Strict):
    """OpenAI's tool_choice that narrows the tools the model may call to some of tools, as mode (auto or
    required) chooses among them. Honoured by showing the model only those (the prompt then differs from one with
    every tool): each is {"type": "function", "name": ...} of a function in tools."""
    type: Literal["allowed_tools"]
    mode: Literal["auto", "required"]
    tools: list[dict[str, Any]]


class TextFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(_Strict):
    format: TextFormat | None = None
    verbosity: str | None = None


class ReasoningConfig(_Strict):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    summary: str | None = None


class ResponsesStreamOptions(_Strict):
    include_obfuscation: bool | None = None   # a no-op: OpenAI pads deltas against length side channels, not here


class _SameAsChat(_Strict):
    """The Responses fields of the same name and meaning in a chat request, passed to it as they are: OpenAI's
    temperature, top_p, parallel_tool_calls, then vLLM's additions."""
    temperature: float | None = None
    top_p: float | None = None
    parallel_tool_calls: bool | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    structured_outputs: dict[str, Any] | None = None
    include_reasoning: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    priority: int | None = None
    cache_salt: str | None = None


class ResponsesRequest(_Request, _SameAsChat):
    model: str | None = None
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | AllowedTools | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    stream: bool | None = False   # null: false (vLLM's; clients that write every field send it)
    request_id: str | None = None             # names the response: its id, as sent (vLLM's)
    store: bool | None = None                   # kept with --responses-store (responses.py)
    previous_response_id: str | None = None
    background: bool | None = None
    # Server-side features: only at the values that ask for none (unsupported(): _Request's 400)
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    include: list[str] | None = None
    truncation: str | None = None
    max_tool_calls: int | None = None
    top_logprobs: int | None = None
    # No-ops
    metadata: dict[str, str] | None = None
    user: str | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: PromptCacheRetention | None = None
    stream_options: ResponsesStreamOptions | None = None

    @model_validator(mode="after")
    def _check_tools(self):
        check_tools([(t.name, t.parameters) for t in self.tools or []], "tools.{}")
        return self

    def includes(self, value: str) -> bool:
        return value in (self.include or ())

    def unsupported(self) -> list[tuple[str, bool, str]]:
        return [
            ("conversation", self.conversation is None, "there are no stored conversations: send the "
             "conversation as input, or continue a stored response with previous_response_id"),
            ("prompt", self.prompt is None, "there are no stored prompts"),
            ("include", set(self.include or ()) <= {_ENCRYPTED, _LOGPROBS},
             f"of its values only {_ENCRYPTED} and {_LOGPROBS} are"),
            ("truncation", self.truncation in (None, "disabled"), "a prompt past the context is a 400"),
            ("max_tool_calls", self.max_tool_calls is None, "no built-in tools run here"),
            ("top_logprobs", not self.top_logprobs or self.includes(_LOGPROBS),
             f"set with include {_LOGPROBS}"),
            ("reasoning.summary", self.reasoning is None or self.reasoning.summary is None,
             "the reasoning comes whole, as reasoning_text"),
            ("text.verbosity", self.text is None or self.text.verbosity is None, "no model here takes it"),
            *((f"text.format.{name}", self._format_field_unset(attr), "set with type json_schema only")
              for name, attr in (("schema", "schema_"), ("name", "name"), ("description", "description"),
                                 ("strict", "strict")))]

    def _format_field_unset(self, attr: str) -> bool:
        """A schema's own field, given with a format of another type (text, json_object), would do nothing."""
        fmt = self.text.format if self.text is not None else None
        return fmt is None or fmt.type == "json_schema" or getattr(fmt, attr) is None


# include ["reasoning.encrypted_content"] (what a stateless client asks for, to send the reasoning back): each
# reasoning item's encrypted_content is its text in base64. Not encrypted (this server holds no secret), but
# opaque, as the field is to a client; sent back, it is the reasoning again.
_ENCRYPTED = "reasoning.encrypted_content"
# include ["message.output_text.logprobs"] (vLLM's, with top_logprobs alternatives): the chat answer's logprobs,
# each {token, logprob, bytes, top_logprobs}, on the output text (streamed: each delta's, without bytes)
_LOGPROBS = "message.output_text.logprobs"


def _encode_reasoning(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _decode_reasoning(blob: str, at: str) -> str:
    try:
        return base64.b64decode(blob, validate=True).decode()
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"{at} is not a reasoning item's encrypted_content from this server", at,
                       "invalid_value") from e
