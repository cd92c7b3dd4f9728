"""POST /v1/responses: OpenAI's Responses API, which vLLM 0.26 serves beside chat completions (the openai SDK's
`client.responses`, and the agents built on it). A chat completion underneath: the request becomes a
ChatCompletionRequest, and its answer, or its stream of chunks, becomes a Response, or its events.

    instructions, input            ->  a system message, then the input: a string is the user's message;
                                       message items (user / system / developer / assistant; input_text and
                                       output_text parts) as messages, function_call items as the assistant's
                                       tool_calls, function_call_output items as role "tool" messages,
                                       reasoning items as the next assistant message's reasoning,
                                       item_reference items as the stored output item they name; a last
                                       assistant message in_progress or incomplete is continued (vLLM's)
    tools (function), tool_choice, parallel_tool_calls  ->  the same chat fields (tool_choice allowed_tools:
                                       only the tools it names, and its mode)
    max_output_tokens, temperature, top_p  ->  max_tokens, temperature, top_p
    text.format text / json_object / json_schema  ->  response_format
    reasoning.effort               ->  reasoning_effort
    the answer                     ->  output items: reasoning (reasoning_text content, from --reasoning-parser),
                                       message (output_text), function_call; status completed, or incomplete
                                       (max_output_tokens) when the output was cut short

A stream is the Responses events: response.created, response.in_progress, then for each item
output_item.added, its content_part.added, deltas (output_text / reasoning_text / function_call_arguments),
their .done events and output_item.done, then response.completed, the one last event, its response's status
completed or incomplete (vLLM's: the openai SDK's stream helper takes its final response only from
response.completed; OpenAI's API would end an incomplete one with response.incomplete); each with its
sequence_number.

State: with --responses-store N the server keeps the last N responses asked to be stored (store true, with the
conversation each ended: response_store.py); previous_response_id continues one (its messages, less system ones:
instructions do not carry over, then the new instructions and input), and GET / DELETE /v1/responses/{id} read
and remove one. A response no longer kept is a 404 naming it. Without the flag store true is a 400 (vLLM
silently stores nothing). background true (with store true, not streamed) answers at once with the response
queued and runs it detached from the HTTP request: GET reads it in progress, then completed, incomplete or
failed; POST /v1/responses/{id}/cancel stops it. include message.output_text.logprobs (with top_logprobs, as
vLLM) puts the chat answer's logprobs on the output text, for answers that are only text (no tools, no
--reasoning-parser: a 400 naming include). conversation, prompt, include's other values (but
reasoning.encrypted_content, below), truncation auto, max_tool_calls and reasoning.summary are a 400 naming the
field, as are tools other than functions and input other than text. No-ops: metadata (echoed), user, service_tier
(OpenAI's tiers, echoed), safety_identifier, prompt_cache_key, prompt_cache_retention, stream_options (its
include_obfuscation). vLLM's additions pass to the chat request as they are: top_k, seed, stop, logit_bias,
presence / frequency / repetition penalties, ignore_eos, skip_special_tokens, include_stop_str_in_output,
structured_outputs, include_reasoning, chat_template_kwargs, priority, cache_salt;
request_id names the response (resp_<request_id>).
"""
import asyncio
import base64
import copy
import json
import re
import time
import uuid
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import Response
from pydantic import Field, model_validator

from pagedllm.server.chat import chunk_dicts, create_chat_completion
from pagedllm.server.errors import APIError, shorten
from pagedllm.server.protocol import ChatCompletionRequest, _Request, _Strict, fields_of_its_type, validated
from pagedllm.server.response_store import StoredResponse
from pagedllm.server.serving import SSEResponse, ServingContext


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
    # was. The chat templates served here have no place for it, so it is taken and dropped, as vLLM drops it.
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
    request_id: str | None = None             # names the response: resp_<request_id>
    store: bool | None = None                   # kept with --responses-store (create_response)
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
    # OpenAI's most a prompt's cached prefix may be kept. The prefix cache keeps blocks while the KV cache (and its
    # CPU / disk tiers, where configured) has room for them, evicting the least recently used: never by age, so
    # neither value changes it. vLLM takes the field and ignores it.
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    stream_options: ResponsesStreamOptions | None = None

    @model_validator(mode="after")
    def _check_tools(self):
        """OpenAI's 400s (vLLM takes both): a function's arguments are a JSON object, so its parameters schema is
        an object's; and a call names its function, so no two share a name (a forced call's schema was then
        either's)."""
        seen = set()
        for i, tool in enumerate(self.tools or []):
            kind = (tool.parameters or {}).get("type", "object")
            if kind != "object":
                raise APIError(400, f"tools.{i}.parameters must be the schema of an object (a function's arguments "
                               f"are a JSON object), not of type {shorten(str(kind))!r}", f"tools.{i}.parameters",
                               "invalid_value")
            if tool.name in seen:
                raise APIError(400, f"tools.{i}.name: another tool is named {shorten(tool.name)!r}; tool names must "
                               "be unique", f"tools.{i}.name", "invalid_value")
            seen.add(tool.name)
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


async def create_response(ctx: ServingContext, req: ResponsesRequest, raw_request: Request):
    if req.store and ctx.responses is None:
        raise APIError(400, "store true needs a server that keeps responses (pagedllm serve --responses-store N); "
                       "send the whole conversation as input, with store false", "store", "unsupported_parameter")
    response_id = f"resp_{req.request_id or uuid.uuid4().hex}"
    if req.store and req.request_id is not None and (ctx.responses.get(response_id) is not None
                                                     or response_id in ctx.responses.running):
        # kept under the same id, it would replace the one kept (a background one then ran on out of reach of
        # cancel and DELETE, and came back after a DELETE)
        raise APIError(400, f"request_id names response {response_id!r}, which is already stored: store needs an "
                       "unused request_id", "request_id", "invalid_value")
    req = _resolve_references(ctx, req)
    history = []
    if req.previous_response_id is not None:
        previous = stored_response(ctx, req.previous_response_id, "previous_response_id")
        if previous.response["status"] not in ("completed", "incomplete"):   # no answer to continue from
            raise APIError(400, f"response {req.previous_response_id!r} is {previous.response['status']}: only a "
                           "completed or incomplete one can be continued", "previous_response_id", "invalid_value")
        history = previous.messages   # its conversation, kept without its instructions (they do not carry over)
    if req.includes(_LOGPROBS):
        if req.top_logprobs is not None and not 0 <= req.top_logprobs <= 20:
            raise APIError(400, "top_logprobs must be in [0, 20]", "top_logprobs", "invalid_value")
        if ctx.reasoning_parser is not None or req.tools:   # tokens would belong to other items than the text
            raise APIError(400, f"{_LOGPROBS} is served for answers that are only text: not with tools or a "
                           "--reasoning-parser (use /v1/chat/completions)", "include", "unsupported_parameter")
    if req.background and not req.store:
        raise APIError(400, "background needs store true: the response is read back with GET /v1/responses/{id}",
                       "background", "invalid_value")
    if req.background and req.stream:
        raise APIError(400, "a background response is not streamed here: read it with GET /v1/responses/{id}",
                       "stream", "unsupported_parameter")
    # a copy: _messages adds input calls and reasoning to the last assistant message, which may be the stored one
    messages = _messages(req, copy.deepcopy(history))
    chat = to_chat(req, messages)
    # what a later previous_response_id continues: the conversation less this request's instructions (a system or
    # developer message among the input items is the conversation's, and carries over)
    conversation = messages[1:] if req.instructions else messages
    head = _head(req, response_id, req.model or ctx.model_name)
    encrypted = req.includes(_ENCRYPTED)

    def keep(response: dict) -> None:
        if req.store:
            ctx.responses.put(StoredResponse(response, conversation + [_as_message(response["output"])]))
    if req.background:
        queued = {**head, "status": "queued"}
        ctx.responses.put(StoredResponse(queued, conversation))
        ctx.responses.running[head["id"]] = asyncio.ensure_future(_run_detached(ctx, chat, req, head, encrypted,
                                                                                keep))
        return queued
    answer = await _chat_completion(ctx, chat, req, raw_request)
    if isinstance(answer, SSEResponse):
        return ResponsesSSE(answer.engine, answer.request_ids, _events(answer.body_iterator, head, encrypted, keep))
    if isinstance(answer, Response):   # the client left
        return answer
    response = to_response(answer, head, encrypted)
    keep(response)
    return response


async def _run_detached(ctx: ServingContext, chat: ChatCompletionRequest, req: ResponsesRequest, head: dict,
                        encrypted: bool, keep):
    """A background response's work: the chat completion, then the response kept as it ended (completed,
    incomplete, failed with the error, or cancelled)."""
    response_id = head["id"]
    ctx.responses.set_status(response_id, "in_progress")
    try:
        answer = await _chat_completion(ctx, chat, req, _Detached())
        keep(to_response(answer, head, encrypted))
    except asyncio.CancelledError:
        ctx.responses.set_status(response_id, "cancelled")
        raise
    except APIError as e:
        ctx.responses.set_status(response_id, "failed", {"code": e.code or "invalid_request", "message": e.message})
    except Exception as e:   # the engine's error: the response failed, the server goes on
        ctx.responses.set_status(response_id, "failed", {"code": "server_error", "message": str(e)})
    finally:
        ctx.responses.running.pop(response_id, None)


async def _chat_completion(ctx: ServingContext, chat: ChatCompletionRequest, req: ResponsesRequest, raw_request):
    """create_chat_completion of chat (req's), its 400 about a chat field named as the client sent it: the
    response_format that text.format became (the schema's: text.format.schema), and _their_field's."""
    try:
        return await create_chat_completion(ctx, chat, raw_request)
    except APIError as e:
        if e.param == "response_format":
            schema = chat.response_format.get("type") == "json_schema"
            message = e.message.replace("response_format.json_schema.schema", "text.format.schema")
            raise APIError(e.status, message.replace("response_format", "text.format"),
                           "text.format.schema" if schema else "text.format", e.code) from e
        param = _their_field(e.param, _chat_tools(req))
        if param == e.param:
            raise
        message = e.message.replace(f"`{e.param}`", f"`{param}`")   # "... Reduce `messages`."
        if message.startswith(f"{e.param}: "):
            message = f"{param}: {message.removeprefix(f'{e.param}: ')}"
        raise APIError(e.status, message, param, e.code) from e


# A chat field's error names the Responses field it came from (messages: the instructions, a stored response's
# conversation and the input, whose indexes differ)
_FIELDS = {"max_tokens": "max_output_tokens", "messages": "input"}


def _their_field(param: str | None, tool_at: list[int]) -> str | None:
    """_FIELDS, and a tool's: chat's tools.<k>.function.<name> is tools.<tool_at[k]>.<name>."""
    match = re.fullmatch(r"tools\.(\d+)\.function\.(\w+)", param or "")
    return f"tools.{tool_at[int(match[1])]}.{match[2]}" if match else _FIELDS.get(param, param)


def _chat_tools(req: ResponsesRequest) -> list[int]:
    """The indexes in req.tools of the tools the chat request gets: those tool_choice allowed_tools names (each a
    function of tools: else a 400 naming it), or all."""
    tools, choice = req.tools or [], req.tool_choice
    if not isinstance(choice, AllowedTools):
        return list(range(len(tools)))
    index = {t.name: i for i, t in enumerate(tools)}
    at = []
    for j, allowed in enumerate(choice.tools):
        if allowed.get("type") != "function" or allowed.get("name") not in index or len(allowed) != 2:
            raise APIError(400, f"tool_choice.tools.{j} must be {{\"type\": \"function\", \"name\": ...}} naming "
                           f"a function in tools ({', '.join(index)}): only function tools are served",
                           f"tool_choice.tools.{j}", "invalid_value")
        at.append(index[allowed["name"]])
    return at


class _Detached:
    """A background response's stand-in for its HTTP request, which until_disconnect watches: it never leaves."""
    headers: dict = {}   # none (serving.response_id_for reads X-Request-Id)

    async def receive(self):
        await asyncio.Event().wait()


async def cancel_response(ctx: ServingContext, response_id: str) -> dict:
    stored = stored_response(ctx, response_id)
    task = ctx.responses.running.get(response_id)
    if task is None:
        raise APIError(400, f"response {response_id!r} is {stored.response['status']}: only a background response "
                       "still running can be cancelled", "response_id", "invalid_value")
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)   # its engine requests aborted, its status cancelled
    return stored_response(ctx, response_id).response


def retrieve_response(ctx: ServingContext, response_id: str, include: list[str]) -> dict:
    """GET /v1/responses/{id}: the stored response as it was sent, with include's reasoning.encrypted_content
    (each reasoning item's) added; its logprobs are those asked for when it was created."""
    for value in include:
        if value != _ENCRYPTED:
            why = (f"the logprobs of a stored response are those asked for when it was created (include {_LOGPROBS} "
                   "on POST /v1/responses)" if value == _LOGPROBS else f"of its values only {_ENCRYPTED} is")
            raise APIError(400, f"include {shorten(value)!r} is not supported on a retrieval ({why})", "include",
                           "unsupported_parameter")
    response = stored_response(ctx, response_id).response
    if not include:
        return response
    return {**response, "output": [
        _reasoning_item(item["id"], item["content"][0]["text"], item["status"], encrypted=True)
        if item["type"] == "reasoning" and item["content"] else item for item in response["output"]]}


def stored_response(ctx: ServingContext, response_id: str, param: str = "response_id") -> StoredResponse:
    found = ctx.responses.get(response_id) if ctx.responses is not None else None
    if found is None:
        kept = (f"this server keeps the last {ctx.responses.capacity} stored" if ctx.responses is not None else
                "this server keeps no responses (pagedllm serve --responses-store N)")
        raise APIError(404, f"response {response_id!r} not found: {kept}", param, "not_found")
    return found


def _resolve_references(ctx: ServingContext, req: ResponsesRequest) -> ResponsesRequest:
    """req with each item_reference input item replaced by the item it names: an output item (reasoning, message,
    function_call) of a response this server keeps, found by its id. OpenAI resolves them against the items it
    keeps; vLLM passes them on unresolved. Input items are not kept here, so a reference to one is a 404."""
    if isinstance(req.input, str) or all(item.type != "item_reference" for item in req.input):
        return req
    items = []
    for i, item in enumerate(req.input):
        if item.type == "item_reference":
            at = f"input.{i}"
            if not item.id:
                raise APIError(400, f"{at}: an item_reference needs id", at, "invalid_value")
            found = ctx.responses.item(item.id) if ctx.responses is not None else None
            if found is None:
                kept = (f"it names an output item of the last {ctx.responses.capacity} stored responses"
                        if ctx.responses is not None else
                        "this server keeps no responses (pagedllm serve --responses-store N)")
                raise APIError(404, f"{at}: item {shorten(item.id)!r} not found: {kept}", at, "not_found")
            item = InputItem.model_validate(found)
        items.append(item)
    return req.model_copy(update={"input": items})


def _as_message(output: list[dict]) -> dict:
    """A response's output items as the assistant message a later turn's conversation holds."""
    message: dict[str, Any] = {"role": "assistant", "content": None}
    for item in output:
        if item["type"] == "reasoning" and item["content"]:
            message["reasoning"] = item["content"][0]["text"]
        elif item["type"] == "message":
            message["content"] = "".join(part["text"] for part in item["content"])
        elif item["type"] == "function_call":
            message.setdefault("tool_calls", []).append({"id": item["call_id"], "type": "function", "function": {
                "name": item["name"], "arguments": item["arguments"]}})
    if message["content"] is None and "tool_calls" not in message:
        message["content"] = ""
    return message


def to_chat(req: ResponsesRequest, messages: list[dict]) -> ChatCompletionRequest:
    """The chat request of req, whose conversation is messages (_messages)."""
    body: dict[str, Any] = {"model": req.model, "messages": messages, "stream": bool(req.stream)}
    last = req.input[-1] if isinstance(req.input, list) else None
    if (last is not None and (last.type or "message") == "message" and last.role == "assistant"
            and last.status in ("in_progress", "incomplete")):
        # vLLM's partial message (Anthropic's prefill): the answer continues it, not a new assistant turn
        body.update(add_generation_prompt=False, continue_final_message=True)
    for ours, theirs in (("max_tokens", "max_output_tokens"), *((f, f) for f in _SameAsChat.model_fields)):
        if getattr(req, theirs) is not None:
            body[ours] = getattr(req, theirs)
    if req.tools:
        body["tools"] = [{"type": "function", "function": req.tools[i].model_dump(exclude={"type"}, exclude_none=True)}
                         for i in _chat_tools(req)]
    if isinstance(req.tool_choice, AllowedTools):
        body["tool_choice"] = req.tool_choice.mode
    elif req.tool_choice is not None:
        body["tool_choice"] = (req.tool_choice if isinstance(req.tool_choice, str) else
                               {"type": "function", "function": {"name": req.tool_choice.name}})
    fmt = req.text.format if req.text is not None else None
    if fmt is not None and fmt.type == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.schema_ is None:
            raise APIError(400, "text.format.schema is required with type json_schema", "text.format.schema",
                           "invalid_value")
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": fmt.name or "output", "schema": fmt.schema_, "strict": fmt.strict}}
    if req.reasoning is not None and req.reasoning.effort is not None:
        body["reasoning_effort"] = req.reasoning.effort
    if req.includes(_LOGPROBS):
        body["logprobs"], body["top_logprobs"] = True, req.top_logprobs or 0
    if req.stream:
        body["stream_options"] = {"include_usage": True}
    chat = validated(ChatCompletionRequest, body)
    chat._usage_details = True
    return chat


def _messages(req: ResponsesRequest, history: list[dict]) -> list[dict]:
    """The conversation: the instructions as a system message, the history (a stored response's), the input."""
    messages = [{"role": "system", "content": req.instructions}] if req.instructions else []
    messages += history
    if not req.input:
        raise APIError(400, "input must not be empty", "input", "invalid_value")
    if isinstance(req.input, str):
        return messages + [{"role": "user", "content": req.input}]
    thought = None   # a reasoning item's text, for the assistant message after it
    for i, item in enumerate(req.input):
        at = f"input.{i}"
        kind = item.type or "message"
        if kind == "reasoning":
            thought = (thought or "") + _reasoning_text(item, at)
        elif kind == "function_call":
            if not item.call_id or not item.name:
                raise APIError(400, f"{at}: a function_call needs call_id and name", at, "invalid_value")
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments or "{}"}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":   # the turn's text and calls: one message
                last.setdefault("tool_calls", []).append(call)
                continue
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if not item.call_id or item.output is None:
                raise APIError(400, f"{at}: a function_call_output needs call_id and output", at, "invalid_value")
            output = item.output if isinstance(item.output, str) else "\n".join(_texts(item.output, f"{at}.output"))
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": output})
            continue
        else:
            if item.role is None or item.content is None:
                raise APIError(400, f"{at}: a message needs role and content", at, "invalid_value")
            content = item.content if isinstance(item.content, str) else "\n".join(
                _texts(item.content, f"{at}.content"))
            messages.append({"role": "system" if item.role == "developer" else item.role, "content": content})
        if thought is not None and messages and messages[-1]["role"] == "assistant":
            messages[-1]["reasoning"], thought = thought, None
    return messages


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


def _reasoning_text(item: InputItem, at: str) -> str:
    """A reasoning item's text: its content's, or its encrypted_content's; an item sent back as this server sent
    it (include reasoning.encrypted_content) has both, and they must be the same reasoning. An item of neither
    (another server's, which sends summaries) is its summary's text, as vLLM reads it."""
    text = item.content or None   # a string, as a message item's may be, or parts
    if isinstance(text, list):
        text = "".join(_texts(text, f"{at}.content"))
    if item.encrypted_content is None:
        return text if text is not None else "\n".join(part.text for part in item.summary or [])
    decoded = _decode_reasoning(item.encrypted_content, f"{at}.encrypted_content")
    if text is not None and text != decoded:
        raise APIError(400, f"{at}.encrypted_content is another reasoning than {at}.content: send one of them",
                       f"{at}.encrypted_content", "invalid_value")
    return decoded


def _texts(parts: list[ContentPart], at: str) -> list[str]:
    """The parts' texts; a message's are joined by newlines, as chat's content parts (and vLLM's) are."""
    for j, p in enumerate(parts):
        if p.type not in ("input_text", "output_text", "reasoning_text") or p.text is None:
            raise APIError(400, f"{at}.{j}: {p.type} content is not supported (the models served take text)",
                           f"{at}.{j}", "unsupported_parameter")
    return [p.text for p in parts]


def _head(req: ResponsesRequest, response_id: str, model: str) -> dict:
    """The Response's fields that the answer does not change: the request's settings, echoed."""
    fmt = req.text.format.model_dump(by_alias=True, exclude_none=True) if req.text and req.text.format else None
    return {"id": response_id, "object": "response", "created_at": int(time.time()), "status": "in_progress",
            "error": None, "incomplete_details": None, "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens, "model": model, "output": [],
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id, "background": bool(req.background),
            "reasoning": {"effort": req.reasoning.effort if req.reasoning else None, "summary": None},
            "store": bool(req.store), "temperature": req.temperature, "text": {"format": fmt or {"type": "text"}},
            "tool_choice": (req.tool_choice.model_dump() if isinstance(req.tool_choice, (FunctionChoice, AllowedTools))
                            else req.tool_choice or "auto"),
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or []], "top_p": req.top_p,
            "truncation": "disabled", "usage": None, "user": req.user, "metadata": req.metadata or {},
            "service_tier": req.service_tier or "auto"}   # vLLM's echo: the request's, auto by default


def _finished(head: dict, output: list[dict], finish_reason: str | None, usage: dict) -> dict:
    cut = finish_reason == "length"
    return {**head, "status": "incomplete" if cut else "completed", "output": output,
            "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
            "usage": {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
                      "total_tokens": usage["total_tokens"],
                      # OpenAI's schema has both (the SDK's types read them as objects)
                      "input_tokens_details": usage.get("prompt_tokens_details") or {"cached_tokens": 0},
                      "output_tokens_details": usage.get("completion_tokens_details") or {"reasoning_tokens": 0}}}


def to_response(chat: dict, head: dict, encrypted: bool = False) -> dict:
    """A chat completion's answer (its one choice) as a Response."""
    choice = chat["choices"][0]
    message, output = choice["message"], []
    if message.get("reasoning"):
        output.append(_reasoning_item(_id("rs"), message["reasoning"], encrypted=encrypted))
    if message.get("content"):
        output.append(_message_item(_id("msg"), message["content"],
                                    logprobs=(choice.get("logprobs") or {}).get("content") or []))
    for call in message.get("tool_calls") or []:
        output.append(_call_item(_id("fc"), call["id"], call["function"]["name"], call["function"]["arguments"]))
    return _finished(head, output, choice["finish_reason"], chat["usage"])


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _reasoning_item(item_id: str, text: str | None, status: str = "completed", encrypted: bool = False) -> dict:
    item = {"type": "reasoning", "id": item_id, "summary": [], "status": status,
            "content": [] if text is None else [{"type": "reasoning_text", "text": text}]}
    if encrypted and text is not None:
        item["encrypted_content"] = _encode_reasoning(text)
    return item


def _message_item(item_id: str, text: str | None, status: str = "completed", logprobs: list | None = None) -> dict:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [] if text is None else [_text_part(text, logprobs)]}


def _text_part(text: str, logprobs: list | None = None) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def _delta_logprobs(entries: list[dict]) -> list[dict]:
    """A streamed delta's logprobs, as OpenAI's delta events carry them: no bytes."""
    return [{"token": e["token"], "logprob": e["logprob"],
             "top_logprobs": [{"token": t["token"], "logprob": t["logprob"]} for t in e.get("top_logprobs") or []]}
            for e in entries]


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


class ResponsesSSE(SSEResponse):
    end = ""   # the stream ends with response.completed; _events reports its own errors


def _event(data: dict) -> str:
    return f"event: {data['type']}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def _events(chunks, head: dict, encrypted: bool = False, keep=lambda response: None):
    """The chat stream's chunks as the Responses events. One output item is open at a time: a reasoning item
    while reasoning comes, a message while content does, a function_call from a call's first delta. keep gets
    the final response before its event is sent (a stream cut short keeps nothing)."""
    sequence = 0
    output: list[dict] = []
    open_item = None   # (kind, item id, text so far, call id, name) of the item being streamed
    text_logprobs: list[dict] = []   # the open message's logprobs (include message.output_text.logprobs)
    finish_reason, usage = None, None

    def event(data: dict) -> str:
        nonlocal sequence
        sequence += 1
        return _event({**data, "sequence_number": sequence - 1})

    def close() -> list[str]:
        nonlocal open_item
        if open_item is None:
            return []
        kind, item_id, text, call_id, name = open_item
        index, open_item = len(output), None
        at = {"item_id": item_id, "output_index": index}
        if kind == "function_call":
            item = _call_item(item_id, call_id, name, text)
            events = [event({"type": "response.function_call_arguments.done", **at, "arguments": text,
                             "name": name})]
        else:
            part = _text_part(text, text_logprobs) if kind == "message" else {"type": "reasoning_text", "text": text}
            item = (_message_item(item_id, text, logprobs=text_logprobs) if kind == "message"
                    else _reasoning_item(item_id, text, encrypted=encrypted))
            done = ({"type": "response.output_text.done", "text": text, "logprobs": _delta_logprobs(text_logprobs)}
                    if kind == "message" else {"type": "response.reasoning_text.done", "text": text})
            events = [event({**done, **at, "content_index": 0}),
                      event({"type": "response.content_part.done", **at, "content_index": 0, "part": part})]
        output.append(item)
        return events + [event({"type": "response.output_item.done", "output_index": index, "item": item})]

    def open_(kind: str, call_id: str | None = None, name: str | None = None) -> list[str]:
        nonlocal open_item, text_logprobs
        events = close()
        text_logprobs = []
        item_id = _id({"message": "msg", "reasoning": "rs", "function_call": "fc"}[kind])
        open_item = (kind, item_id, "", call_id, name)
        at = {"item_id": item_id, "output_index": len(output)}
        if kind == "function_call":
            return events + [event({"type": "response.output_item.added", "output_index": len(output),
                                    "item": _call_item(item_id, call_id, name, "", "in_progress")})]
        item = (_message_item(item_id, None, "in_progress") if kind == "message"
                else _reasoning_item(item_id, None, "in_progress"))
        part = _text_part("") if kind == "message" else {"type": "reasoning_text", "text": ""}
        return events + [event({"type": "response.output_item.added", "output_index": len(output), "item": item}),
                         event({"type": "response.content_part.added", **at, "content_index": 0, "part": part})]

    def add(kind: str, text: str, logprobs: list[dict] = ()) -> str:
        nonlocal open_item
        text_logprobs.extend(logprobs)
        k, item_id, so_far, call_id, name = open_item
        open_item = (k, item_id, so_far + text, call_id, name)
        at = {"item_id": item_id, "output_index": len(output)}
        if kind == "function_call":
            return event({"type": "response.function_call_arguments.delta", **at, "delta": text})
        if kind == "message":
            return event({"type": "response.output_text.delta", **at, "content_index": 0, "delta": text,
                          "logprobs": _delta_logprobs(logprobs)})
        return event({"type": "response.reasoning_text.delta", **at, "content_index": 0, "delta": text})

    yield event({"type": "response.created", "response": head})
    yield event({"type": "response.in_progress", "response": head})
    try:
        async for chunk in chunk_dicts(chunks):
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                d, out = choice["delta"], []
                if d.get("reasoning"):
                    if open_item is None or open_item[0] != "reasoning":
                        out += open_("reasoning")
                    out.append(add("reasoning", d["reasoning"]))
                entries = (choice.get("logprobs") or {}).get("content") or []   # only text: see create_response
                if d.get("content") or entries:
                    if open_item is None or open_item[0] != "message":
                        out += open_("message")
                    out.append(add("message", d.get("content") or "", entries))
                for call in d.get("tool_calls") or []:
                    if call.get("id") is not None:
                        out += open_("function_call", call["id"], call["function"]["name"])
                    if call["function"].get("arguments"):
                        out.append(add("function_call", call["function"]["arguments"]))
                if choice.get("finish_reason") is not None:
                    finish_reason = choice["finish_reason"]
                for e in out:
                    yield e
    except Exception as e:   # the engine's error mid-stream: the Responses error event ends the stream
        yield event({"type": "error", "code": "server_error", "message": str(e), "param": None})
        return
    for e in close():
        yield e
    final = _finished(head, output, finish_reason, usage or {"prompt_tokens": 0, "completion_tokens": 0,
                                                              "total_tokens": 0})
    keep(final)
    yield event({"type": "response.completed", "response": final})   # an incomplete one too, as vLLM sends it
