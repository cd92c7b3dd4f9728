"""POST /v1/responses: OpenAI's Responses API, which vLLM 0.26 serves beside chat completions (the openai SDK's
`client.responses`, and the agents built on it). A chat completion underneath: the request (responses_request.py)
becomes a ChatCompletionRequest (responses_input.py), and its answer, or its stream of chunks, becomes a Response,
or its events (responses_output.py). This file is the route around them: the checks that need the server's state,
stored responses and their continuation, background runs, and a chat field's error named as the Responses field
it came from.

State: with --responses-store N the server keeps the last N responses asked to be stored (store true, with the
conversation each ended: response_store.py); previous_response_id continues one (its messages, less system ones:
instructions do not carry over, then the new instructions and input), and GET / DELETE /v1/responses/{id} read
and remove one. A response no longer kept is a 404 naming it. Without the flag store true is a 400 (vLLM
silently stores nothing). background true (with store true, not streamed) answers at once with the response
queued and runs it detached from the HTTP request: GET reads it in progress, then completed, incomplete or
failed; POST /v1/responses/{id}/cancel stops it. include message.output_text.logprobs (with top_logprobs, as
vLLM) puts the chat answer's logprobs on the output text, for answers that are only text (no tools, no
--reasoning-parser: a 400 naming include).
"""
import asyncio
import copy
import re
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from pagedllm.server.chat import create_chat_completion, run_limit
from pagedllm.server.errors import APIError, shorten
from pagedllm.server.protocol import ChatCompletionRequest
from pagedllm.server.response_store import StoredResponse
from pagedllm.server.responses_input import _messages, to_chat
from pagedllm.server.responses_output import (ResponsesSSE, _events, _head, _reasoning_item, ran_under,
                                              to_response)
from pagedllm.server.responses_request import _ENCRYPTED, _LOGPROBS, InputItem, ResponsesRequest
from pagedllm.server.serving import SSEResponse, ServingContext


async def create_response(ctx: ServingContext, req: ResponsesRequest, raw_request: Request):
    if req.store is None:   # OpenAI's and vLLM's default is true: kept where this server keeps responses
        req = req.model_copy(update={"store": ctx.responses is not None})
    if req.store and ctx.responses is None:
        raise APIError(400, "store true needs a server that keeps responses (pagedllm serve --responses-store N); "
                       "send the whole conversation as input, with store false", "store", "unsupported_parameter")
    response_id = req.request_id or f"resp_{uuid.uuid4().hex}"   # vLLM's: the request_id as sent
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
    head = _head(req, response_id, ctx.served_name(req.model), ctx.engine.default_sampling_params)
    encrypted = req.includes(_ENCRYPTED)

    def keep(response: dict) -> None:
        if req.store:
            ctx.responses.put(StoredResponse(response, conversation + [_as_message(response["output"])]))
    if req.background:
        # vLLM's queued copy says the limit the answer runs to, as the finished one: resolved (and the context
        # checked, a 400) before it is queued
        queued = {**head, "status": "queued", "max_output_tokens": await _their_errors(chat, run_limit(ctx, chat))}
        ctx.responses.put(StoredResponse(queued, conversation))
        ctx.responses.running[head["id"]] = asyncio.ensure_future(_run_detached(ctx, chat, head, encrypted, keep))
        return queued
    answer = await _chat_completion(ctx, chat, raw_request)
    if isinstance(answer, Response) and not isinstance(answer, SSEResponse):   # the client left
        return answer
    head = ran_under(head, chat)
    if isinstance(answer, SSEResponse):
        return ResponsesSSE(answer.engine, answer.request_ids, _events(answer.body_iterator, head, encrypted, keep))
    response = to_response(answer, head, encrypted)
    keep(response)
    return response


async def _run_detached(ctx: ServingContext, chat: ChatCompletionRequest, head: dict, encrypted: bool, keep):
    """A background response's work: the chat completion, then the response kept as it ended (completed,
    incomplete, failed with the error, or cancelled)."""
    response_id = head["id"]
    ctx.responses.set_status(response_id, "in_progress")
    try:
        answer = await _chat_completion(ctx, chat, _Detached())
        keep(to_response(answer, ran_under(head, chat), encrypted))
    except asyncio.CancelledError:
        ctx.responses.set_status(response_id, "cancelled")
        raise
    except APIError as e:
        ctx.responses.set_status(response_id, "failed", {"code": e.code or "invalid_request", "message": e.message})
    except Exception as e:   # the engine's error: the response failed, the server goes on
        ctx.responses.set_status(response_id, "failed", {"code": "server_error", "message": str(e)})
    finally:
        ctx.responses.running.pop(response_id, None)


async def _chat_completion(ctx: ServingContext, chat: ChatCompletionRequest, raw_request):
    """create_chat_completion of chat (the request's), its errors as _their_errors names them."""
    return await _their_errors(chat, create_chat_completion(ctx, chat, raw_request))


async def _their_errors(chat: ChatCompletionRequest, work):
    """work on chat (the request's), its 400 about a chat field named as the client sent it: the response_format
    that text.format became (the schema's: text.format.schema), and _their_field's."""
    try:
        return await work
    except APIError as e:
        if e.param == "response_format":
            schema = chat.response_format.get("type") == "json_schema"
            message = e.message.replace("response_format.json_schema.schema", "text.format.schema")
            raise APIError(e.status, message.replace("response_format", "text.format"),
                           "text.format.schema" if schema else "text.format", e.code) from e
        param = _their_field(e.param)
        if param == e.param:
            raise
        message = e.message.replace(f"`{e.param}`", f"`{param}`")   # "... Reduce `messages`."
        if message.startswith(f"{e.param}: "):
            message = f"{param}: {message.removeprefix(f'{e.param}: ')}"
        raise APIError(e.status, message, param, e.code) from e


# A chat field's error names the Responses field it came from (messages: the instructions, a stored response's
# conversation and the input, whose indexes differ)
_FIELDS = {"max_tokens": "max_output_tokens", "messages": "input"}


def _their_field(param: str | None) -> str | None:
    """_FIELDS, and a tool's: chat's tools.<i>.function.<name> is tools.<i>.<name>."""
    match = re.fullmatch(r"tools\.(\d+)\.function\.(\w+)", param or "")
    return f"tools.{match[1]}.{match[2]}" if match else _FIELDS.get(param, param)




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
