"""A Responses answer: the chat completion's answer as a Response, or its stream of chunks as the Responses
events.

    the answer                     ->  output items: reasoning (reasoning_text content, from --reasoning-parser),
                                       message (output_text), function_call; status completed, or incomplete
                                       (max_output_tokens) when the output was cut short

A stream is the Responses events: response.created, response.in_progress, then for each item
output_item.added, its content_part.added, deltas (output_text / reasoning_text / function_call_arguments),
their .done events and output_item.done, then response.completed, the one last event, its response's status
completed or incomplete (vLLM's: the openai SDK's stream helper takes its final response only from
response.completed; OpenAI's API would end an incomplete one with response.incomplete); each with its
sequence_number.
"""
import time
import uuid

from pagedllm.server.chat import chunk_dicts
from pagedllm.server.protocol import ChatCompletionRequest
from pagedllm.server.responses_request import (_LOGPROBS, AllowedTools, FunctionChoice, ResponsesRequest,
                                               _encode_reasoning)
from pagedllm.server.serving import SSEResponse, sse_event


def _head(req: ResponsesRequest, response_id: str, model: str, defaults: dict) -> dict:
    """The Response's fields that the answer does not change: the request's settings, echoed. defaults: the
    engine's sampling defaults (generation config): temperature, top_p and the penalties say the values used, as
    vLLM's do (ran_under() then puts in those the chat request resolved)."""
    temperature = req.temperature if req.temperature is not None else defaults.get("temperature", 1.0)
    top_p = req.top_p if req.top_p is not None else defaults.get("top_p", 1.0)
    penalties = {name: getattr(req, name) if getattr(req, name) is not None else defaults.get(name, 0.0)
                 for name in ("presence_penalty", "frequency_penalty")}
    fmt = req.text.format.model_dump(by_alias=True, exclude_none=True) if req.text and req.text.format else None
    return {"id": response_id, "object": "response", "created_at": int(time.time()), "status": "in_progress",
            "error": None, "incomplete_details": None, "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens, "model": model, "output": [],
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id, "background": bool(req.background),
            "reasoning": {"effort": req.reasoning.effort if req.reasoning else None, "summary": None},
            "store": bool(req.store), "temperature": temperature, "text": {"format": fmt or {"type": "text"}},
            "tool_choice": (req.tool_choice.model_dump() if isinstance(req.tool_choice, (FunctionChoice, AllowedTools))
                            else req.tool_choice or "auto"),
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or []], "top_p": top_p,
            "truncation": "disabled", "usage": None, "user": req.user, "metadata": req.metadata or {},
            "service_tier": req.service_tier or "auto",   # vLLM's echo: the request's, auto by default
            # vLLM's echo: top_logprobs those the output text carries (null without include's logprobs);
            # max_tool_calls and prompt are refused unless null (responses_request.py)
            "top_logprobs": (req.top_logprobs or 0) if req.includes(_LOGPROBS) else None, "max_tool_calls": None,
            "prompt": None, **penalties}


def ran_under(head: dict, chat: ChatCompletionRequest) -> dict:
    """head with the settings the answer ran under, which create_chat_completion resolved for chat (vLLM's echo:
    its SamplingParams'): max_output_tokens the limit it ran to (unset: the room the prompt left, or the
    generation config's max_new_tokens), temperature as the sampler took it, the penalties."""
    params = chat._params
    return {**head, "max_output_tokens": chat._max_tokens, "temperature": params.temperature,
            "presence_penalty": params.presence_penalty, "frequency_penalty": params.frequency_penalty}


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
    # No `phase`, though a sent message item's is taken (responses_request.InputItem): OpenAI's output phase is the
    # model's own label of the message it wrote (commentary before tool calls, final_answer), from models trained to
    # write it, never the input's echoed; vLLM's output messages carry none (harmony's commentary and final
    # channels both become plain message items). The models served here label nothing, and a phase made up from
    # whether calls follow would be inferred, not the model's: so none, as vLLM.
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
        return sse_event(data["type"], {**data, "sequence_number": sequence - 1})

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
                entries = (choice.get("logprobs") or {}).get("content") or []   # only text: responses.create_response
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
