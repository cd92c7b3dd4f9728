"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API, which vLLM 0.26 serves beside
OpenAI's (Claude Code and Anthropic's SDKs speak it). A chat completion underneath: the request becomes a
ChatCompletionRequest, and its answer, or its stream of chunks, becomes Anthropic's message, or events.

    system, messages               ->  a system message, then the messages (a last assistant message is continued:
                                       Anthropic's prefill): text blocks as text, tool_use blocks
                                       as the assistant's tool_calls (input as JSON arguments), thinking blocks
                                       as its reasoning (redacted_thinking ones left out), tool_result blocks
                                       as role "tool" messages (is_error: their text after "Error: ")
    tools {name, description, input_schema}, tool_choice auto / any / tool / none
                                   ->  tools, tool_choice auto / required / a named function / none
                                       (disable_parallel_tool_use: parallel_tool_calls false)
    max_tokens, stop_sequences, temperature, top_p, top_k  ->  the same sampling fields
    thinking enabled {budget_tokens} / adaptive / disabled
                                   ->  thinking on (needs --reasoning-parser) with thinking_token_budget / on /
                                       enable_thinking false; display omitted: thinking blocks without text
    output_config {format: json_schema, effort}  ->  response_format json_schema, reasoning_effort (vLLM's)
    the answer                     ->  content blocks: thinking (the reasoning parser's), text, tool_use;
                                       stop_reason end_turn, stop_sequence (with stop_sequence), max_tokens,
                                       tool_use; usage input_tokens / output_tokens (and the prompt tokens
                                       read from / written to the prefix cache apart, cache_read_input_tokens /
                                       cache_creation_input_tokens, with --enable-prompt-tokens-details)

A stream is Anthropic's events: message_start, then each block's content_block_start, _delta (text_delta,
thinking_delta then a signature_delta, input_json_delta) and _stop, then message_delta (stop_reason, usage)
and message_stop; no [DONE]. Errors are Anthropic's {"type": "error", "error": {"type", "message"}} (errors.py
picks the shape by route), in a stream an `error` event. temperature, top_p and top_k are vLLM's (Anthropic's
SDK now sends them only in extra_body). No-ops: metadata, service_tier, speed, inference_geo, user_profile_id,
workspace_id, cache_control (top-level, on blocks and tools: the prefix cache is automatic), a text block's
citations; a tool's strict and defer_loading reach the chat template only (vLLM's).
Images and documents are a 400: the models served take text.
"""
import json
import re
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import Response
from pydantic import Field, field_validator, model_validator

from pagedllm.server.chat import chunk_dicts, create_chat_completion, render_chat
from pagedllm.engine.async_llm import EngineGenerateError
from pagedllm.server.errors import APIError, anthropic_error_body, bad_value
from pagedllm.server.protocol import ChatCompletionRequest, _Request, _Strict, fields_of_its_type, validated
from pagedllm.server.serving import SSEResponse, ServingContext, client_error, sse_event


class ContentBlock(_Strict):
    """One block of a message's content; which fields a type takes is checked where it is read."""
    type: Literal["text", "image", "document", "tool_use", "tool_result", "tool_reference", "thinking",
                  "redacted_thinking"]
    text: str | None = None
    # a no-op: what a Claude answer's text cited (replayed, most often null); documents are a 400 here
    citations: list[dict[str, Any]] | None = None
    id: str | None = None                   # tool_use
    name: str | None = None
    input: dict[str, Any] | None = None
    tool_use_id: str | None = None          # tool_result
    content: str | list["ContentBlock"] | None = None
    is_error: bool | None = None
    tool_name: str | None = None            # tool_reference (in a tool_result: the tool it loads, tool search)
    thinking: str | None = None             # thinking
    signature: str | None = None
    data: str | None = None                 # redacted_thinking
    source: dict[str, Any] | None = None    # image, document
    cache_control: dict[str, Any] | None = None   # a no-op

    @model_validator(mode="after")
    def _own_fields(self):
        return fields_of_its_type(self, {t: (*f, "cache_control") for t, f in {
            "text": ("text", "citations"), "image": ("source",), "document": ("source",),
            "tool_use": ("id", "name", "input"), "tool_result": ("tool_use_id", "content", "is_error"),
            "tool_reference": ("tool_name",),
            "thinking": ("thinking", "signature"),
            "redacted_thinking": ("data",)}.items()}, "a content block")


class MessageParam(_Strict):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class ToolParam(_Strict):
    name: str = Field(min_length=1)
    description: str | None = None
    input_schema: dict[str, Any]
    # for the template only, as in vLLM (which renders it): a forced call (tool_choice any / tool) follows
    # input_schema anyway, an auto one is the model's own, as with chat's function strict
    strict: bool | None = None
    defer_loading: bool | None = None       # for the template (tool search), as vLLM passes it
    type: Literal["custom"] | None = None
    cache_control: dict[str, Any] | None = None   # a no-op

    @field_validator("input_schema")
    @classmethod
    def _an_object(cls, schema: dict) -> dict:
        return schema if "type" in schema else {**schema, "type": "object"}   # vLLM's default: the prompt shows it


class ToolChoiceParam(_Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None                 # type tool
    disable_parallel_tool_use: bool | None = None

    @model_validator(mode="after")
    def _own_fields(self):
        parallel = ("disable_parallel_tool_use",)
        return fields_of_its_type(self, {"auto": parallel, "any": parallel, "tool": ("name", *parallel), "none": ()},
                                  "a tool_choice")


class ThinkingParam(_Strict):
    type: Literal["enabled", "adaptive", "disabled"]
    budget_tokens: int | None = Field(None, ge=0)      # enabled
    display: Literal["summarized", "omitted"] | None = None   # omitted: thinking blocks without their text


class OutputFormat(_Strict):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Strict):
    format: OutputFormat | None = None
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None


class CountTokensRequest(_Request):
    model: str = Field(min_length=1)
    messages: list[MessageParam] = Field(min_length=1)
    system: str | list[ContentBlock] | None = None
    tools: list[ToolParam] | None = None
    tool_choice: ToolChoiceParam | None = None
    thinking: ThinkingParam | None = None
    chat_template_kwargs: dict[str, Any] | None = None   # vLLM's: extra template variables


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    stream: bool | None = False   # null: false (vLLM's; clients that write every field send it)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    output_config: OutputConfig | None = None
    # No-ops: labels, and service options that cannot change the output (the prefix cache is automatic)
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    speed: Literal["standard", "fast"] | None = None
    cache_control: dict[str, Any] | None = None
    inference_geo: str | None = None
    user_profile_id: str | None = None
    workspace_id: str | None = None


# A chat field's error names the Anthropic field it came from.
_FIELDS = {"stop": "stop_sequences", "thinking_token_budget": "thinking.budget_tokens",
           "response_format": "output_config.format", "reasoning_effort": "output_config.effort"}


def _their_field(param: str | None) -> str | None:
    """_FIELDS, and a tool's: chat's tools.<i>.function.parameters is tools.<i>.input_schema, its
    tools.<i>.function.<name> is tools.<i>.<name>."""
    match = re.fullmatch(r"tools\.(\d+)\.function\.(\w+)", param or "")
    if match:
        return f"tools.{match[1]}.{'input_schema' if match[2] == 'parameters' else match[2]}"
    return _FIELDS.get(param, param)


async def create_message(ctx: ServingContext, req: MessagesRequest, raw_request: Request):
    chat = to_chat(ctx, req)
    try:
        answer = await create_chat_completion(ctx, chat, raw_request)
    except (APIError, ValueError) as e:
        error = e if isinstance(e, APIError) else bad_value(e)
        param, message = _their_field(error.param), error.message
        if param != error.param:   # a message that starts with the chat field's name starts with ours instead
            message = f"{param}: {message.removeprefix(f'{error.param}: ')}"
        raise APIError(error.status, message, param, error.code) from e
    shown = req.thinking is None or req.thinking.display != "omitted"   # else thinking blocks come empty
    if isinstance(answer, SSEResponse):
        return AnthropicSSE(answer.engine, answer.request_ids, _events(
            answer.body_iterator, req.stop_sequences or [], shown), answer.param)
    if isinstance(answer, Response):   # the client left
        return answer
    return to_message(answer, req.stop_sequences or [], shown)


async def count_tokens(ctx: ServingContext, req: CountTokensRequest) -> dict:
    await ctx.resolve_model(req.model)
    _, ids = await render_chat(ctx, to_chat(ctx, req))
    # vLLM 0.26's (and Anthropic's context management): the count before any context was cleared; none is here
    return {"input_tokens": len(ids), "context_management": {"original_input_tokens": len(ids)}}


def to_chat(ctx: ServingContext, req: CountTokensRequest) -> ChatCompletionRequest:
    body: dict[str, Any] = {"model": req.model, "messages": _chat_messages(req)}
    last = req.messages[-1]   # (its converted message may be none: a user's empty content)
    calls = isinstance(last.content, list) and any(b.type == "tool_use" for b in last.content)
    if last.role == "assistant" and not calls:
        # Anthropic's prefill: the answer continues that message. One with calls is whole: continuing it cut them
        # out of the prompt (the template's text ends at the content); it gets a new turn after it, as vLLM's.
        body.update(add_generation_prompt=False, continue_final_message=True)
    kwargs = dict(req.chat_template_kwargs or {})
    thinking = req.thinking
    if thinking is not None:
        on = thinking.type != "disabled"
        if on and ctx.reasoning_parser is None:
            raise APIError(400, "thinking needs the server to run with --reasoning-parser (it knows where thinking "
                                "ends)", "thinking", "invalid_value")
        if (thinking.type == "enabled") != (thinking.budget_tokens is not None):
            raise APIError(400, "thinking.budget_tokens goes with thinking.type enabled, and only there",
                           "thinking.budget_tokens", "invalid_value")
        kwargs.setdefault("enable_thinking", on)
        if thinking.budget_tokens is not None:
            body["thinking_token_budget"] = thinking.budget_tokens
    if kwargs:
        body["chat_template_kwargs"] = kwargs
    if req.tools:
        body["tools"] = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                           "parameters": t.input_schema, "strict": t.strict,
                                                           "defer_loading": t.defer_loading}} for t in req.tools]
    choice = req.tool_choice
    if choice is not None and (req.tools or choice.type != "auto"):   # auto with no tools is none; chat refuses it
        if choice.type == "tool" and not choice.name:
            raise APIError(400, "tool_choice.name is required when tool_choice.type is tool", "tool_choice.name",
                           "invalid_value")
        body["tool_choice"] = ({"type": "function", "function": {"name": choice.name}} if choice.type == "tool"
                               else {"any": "required"}.get(choice.type, choice.type))
        if choice.disable_parallel_tool_use:
            body["parallel_tool_calls"] = False
    if isinstance(req, MessagesRequest):
        body.update(max_tokens=req.max_tokens, stream=bool(req.stream))
        for ours, theirs in (("stop", "stop_sequences"), ("temperature", "temperature"), ("top_p", "top_p"),
                             ("top_k", "top_k")):
            if getattr(req, theirs) is not None:
                body[ours] = getattr(req, theirs)
        if req.stream:   # the prompt's length comes with the first chunk, the output's with the last
            body.update(stream_options={"include_usage": True}, return_token_ids=True)
        out = req.output_config
        if out is not None and out.format is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "output",
                                                                              "schema": out.format.schema_}}
        if out is not None and out.effort is not None:
            body["reasoning_effort"] = out.effort
    return validated(ChatCompletionRequest, body)


def _chat_messages(req: CountTokensRequest) -> list[dict]:
    messages = []
    if req.system:
        # blocks joined as they are (vLLM's), less Claude Code's attribution header: its per-request hash would
        # make every prompt's start differ, so no prefix would be cached (vLLM drops it too)
        system = req.system if isinstance(req.system, str) else "".join(
            t for t in (_text(b, "system") for b in req.system) if not t.startswith("x-anthropic-billing-header"))
        if system:
            messages.append({"role": "system", "content": system})
    for i, m in enumerate(req.messages):
        where = f"messages.{i}.content"
        if isinstance(m.content, str):
            messages.append({"role": m.role, "content": m.content})
            continue
        texts, calls, thoughts = [], [], []
        for j, b in enumerate(m.content):
            at = f"{where}.{j}"
            if b.type == "text":
                if b.text:   # an empty one is left out of the join, as vLLM's
                    texts.append(_text(b, at))
            elif b.type == "tool_use" and m.role == "assistant":
                if not b.id or not b.name:
                    raise APIError(400, f"{at}: a tool_use block needs id and name", at, "invalid_value")
                calls.append({"id": b.id, "type": "function",
                              "function": {"name": b.name, "arguments": json.dumps(b.input or {})}})
            elif b.type == "tool_result" and m.role == "user":
                if not b.tool_use_id:
                    raise APIError(400, f"{at}: a tool_result block needs tool_use_id", at, "invalid_value")
                parts = [] if isinstance(b.content, str) else b.content or []
                said = [_text(c, f"{at}.content.{k}") for k, c in enumerate(parts) if c.type != "tool_reference"]
                result = b.content if isinstance(b.content, str) else "\n".join(said)
                messages.append({"role": "tool", "tool_call_id": b.tool_use_id,
                                 "content": f"Error: {result}" if b.is_error else result})
                refs = [{"type": "tool_reference", "name": c.tool_name} for c in parts if c.type == "tool_reference"]
                if refs:   # the tools it loads (tool search), for the template: a tool message of their own (vLLM's)
                    messages.append({"role": "tool", "tool_call_id": b.tool_use_id, "content": refs})
            elif b.type == "thinking" and m.role == "assistant":
                thoughts.append(b.thinking or "")
            elif b.type == "redacted_thinking" and m.role == "assistant":
                continue   # encrypted reasoning no model here can read: left out, as vLLM does (a replayed history)
            else:
                raise APIError(400, f"{at}: {b.type} blocks in a {m.role} message are not supported"
                                    f"{' (the models served take text)' if b.type in ('image', 'document') else ''}",
                               at, "unsupported_parameter")
        if texts or calls or thoughts or m.role == "assistant":
            # text blocks joined as chat's content parts are (and vLLM's): by newlines
            message = {"role": m.role, "content": "\n".join(texts) if texts else None}
            if calls:
                message["tool_calls"] = calls
            if thoughts:
                message["reasoning"] = "".join(thoughts)
            messages.append(message)
    return messages


def _text(b: ContentBlock, at: str) -> str:
    if b.type != "text" or b.text is None:
        raise APIError(400, f"{at}: only text blocks are taken here, got {b.type}", at, "invalid_value")
    return b.text


def to_message(chat: dict, stop_sequences: list[str], shown: bool = True) -> dict:
    """A chat completion's answer (its one choice) as Anthropic's message. Its id and model are the chat answer's,
    as vLLM's: "chatcmpl-..." (X-Request-Id's too), and the served model's name, an alias asked for or not."""
    choice = chat["choices"][0]
    message, content = choice["message"], []
    if message.get("reasoning"):
        content.append({"type": "thinking", "thinking": message["reasoning"] if shown else "", "signature": ""})
    if message.get("content"):
        content.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or []:
        content.append({"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
                        "input": _input(call["function"]["arguments"])})
    if not content:   # vLLM's (and Anthropic's) empty answer: one empty text block, not none
        content.append({"type": "text", "text": ""})
    stop_reason, stop_sequence = _stop(choice["finish_reason"], choice.get("stop_reason"), stop_sequences,
                                       bool(message.get("tool_calls")))
    return {"id": chat["id"], "type": "message", "role": "assistant", "model": chat["model"], "content": content,
            "stop_reason": stop_reason, "stop_sequence": stop_sequence,
            "usage": _usage(chat["usage"])}


def _usage(usage: dict) -> dict:
    """A chat usage as Anthropic's, as vLLM builds it: Anthropic counts the prompt tokens read from the cache
    and those written to it apart from input_tokens, so with --enable-prompt-tokens-details (chat's
    prompt_tokens_details) they are cache_read_input_tokens and cache_creation_input_tokens (chat's
    created_cache_tokens), and input_tokens the rest."""
    details = usage.get("prompt_tokens_details") or {}
    cached, created = details.get("cached_tokens"), details.get("created_cache_tokens")
    out = {"input_tokens": max(0, usage["prompt_tokens"] - (cached or 0) - (created or 0)),
           "output_tokens": usage["completion_tokens"] or 0}
    if created is not None:
        out["cache_creation_input_tokens"] = created
    if cached is not None:
        out["cache_read_input_tokens"] = cached
    return out


def _input(arguments: str) -> dict:
    """A call's JSON arguments as tool_use's input, an object; other JSON is kept under "arguments", and so is
    text that is no JSON (a call max_tokens cut short: the response's stop_reason is then max_tokens, as chat's
    finish_reason is length with the partial arguments; json.loads raising made it a 400)."""
    try:
        value = json.loads(arguments or "{}")
    except (json.JSONDecodeError, RecursionError):   # not JSON, or nested past the decoder's depth
        return {"arguments": arguments}
    return value if isinstance(value, dict) else {"arguments": value}


def _stop(finish_reason: str | None, stop_reason, stop_sequences: list[str],
          called: bool) -> tuple[str | None, str | None]:
    # a forced call (tool_choice tool) is chat's finish_reason "stop", and Anthropic's tool_use as any call
    if finish_reason == "tool_calls" or (finish_reason == "stop" and called):
        return "tool_use", None
    if finish_reason == "length":
        return "max_tokens", None
    if isinstance(stop_reason, str) and stop_reason in stop_sequences:
        return "stop_sequence", stop_reason
    return ("end_turn" if finish_reason is not None else None), None


class AnthropicSSE(SSEResponse):
    end = ""   # Anthropic's streams end with message_stop

    def error_event(self, e: Exception) -> str:
        """The error a non-streamed request would answer, in Anthropic's shape: a 400 the engine found mid-way
        names the Anthropic field that set it; anything else is a server error (api_error)."""
        if isinstance(e, EngineGenerateError):
            e = client_error(e, self.param)
        if isinstance(e, APIError):
            return sse_event("error", anthropic_error_body(e.status, e.message, _their_field(e.param)))
        return sse_event("error", anthropic_error_body(500, str(e)))


async def _events(chunks, stop_sequences: list[str], shown: bool = True):
    """The chat stream's chunks as Anthropic's events. One block is open at a time: a thinking block while
    reasoning comes, a text block while content does, a tool_use block from a call's first delta. Text that comes
    while a tool_use block is open waits for that block's end, then is a text block of one delta (vLLM's): the
    call's arguments still to come stay in its block."""
    index, open_type, calls = -1, None, {}   # the open block's index and type; a call's index -> its block's
    pending: list[str] = []   # the text held while a tool_use block is open
    finish_reason = stop_reason = None
    input_tokens, usage = 0, None   # the prompt's length (message_start); the chat's usage at the end
    started = False

    def close_block() -> list[str]:
        nonlocal index, open_type
        if open_type is None:
            return []
        # a thinking block ends with its signature, as Anthropic's (and vLLM's) streams do: the one the
        # non-streamed block has, ""
        signed = [delta("signature_delta", "signature", "")] if open_type == "thinking" else []
        events = signed + [stop_event()]
        open_type = None
        if pending:   # the text held while the tool_use block was open
            index += 1
            events += [start_event({"type": "text", "text": ""}), delta("text_delta", "text", "".join(pending)),
                       stop_event()]
            pending.clear()
        return events

    def start_event(block: dict) -> str:
        return sse_event("content_block_start", {"type": "content_block_start", "index": index,
                                                 "content_block": block})

    def stop_event() -> str:
        return sse_event("content_block_stop", {"type": "content_block_stop", "index": index})

    def open_block(block: dict):
        nonlocal index, open_type
        events = close_block()
        index, open_type = index + 1, block["type"]
        return events + [start_event(block)]

    def delta(kind: str, key: str, value: str) -> str:
        return sse_event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                 "delta": {"type": kind, key: value}})

    async for chunk in chunk_dicts(chunks):
        if chunk.get("prompt_token_ids") is not None:   # on the role chunk; null when not asked
            input_tokens = len(chunk["prompt_token_ids"])
        if not started:
            started = True
            yield sse_event("message_start", {"type": "message_start", "message": {
                # named by the chat stream (to_message's id and model)
                "id": chunk["id"], "type": "message", "role": "assistant", "model": chunk["model"], "content": [],
                "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": input_tokens, "output_tokens": 0}}})
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk.get("choices", []):
            d = choice["delta"]
            out = []
            if d.get("reasoning"):
                if open_type != "thinking":
                    # no signature yet, as vLLM's and Anthropic's: it comes in the block's last delta
                    out += open_block({"type": "thinking", "thinking": ""})
                if shown:
                    out.append(delta("thinking_delta", "thinking", d["reasoning"]))
            if d.get("content") and open_type == "tool_use":
                pending.append(d["content"])
            elif d.get("content"):
                if open_type != "text":
                    out += open_block({"type": "text", "text": ""})
                out.append(delta("text_delta", "text", d["content"]))
            for call in d.get("tool_calls") or []:
                if call.get("id") is not None:
                    out += open_block({"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
                                       "input": {}})
                    calls[call["index"]] = index
                arguments = call["function"].get("arguments")
                if arguments and calls.get(call["index"]) == index:
                    out.append(delta("input_json_delta", "partial_json", arguments))
            if choice.get("finish_reason") is not None:
                finish_reason, stop_reason = choice["finish_reason"], choice.get("stop_reason")
            for event in out:
                yield event
    for event in close_block():
        yield event
    reason, sequence = _stop(finish_reason, stop_reason, stop_sequences, bool(calls))
    yield sse_event("message_delta", {"type": "message_delta", "delta": {"stop_reason": reason,
                                                                         "stop_sequence": sequence},
                                      # vLLM's: the whole usage, input_tokens too
                                      "usage": _usage(usage) if usage else {"input_tokens": input_tokens,
                                                                            "output_tokens": 0}})
    yield sse_event("message_stop", {"type": "message_stop"})
