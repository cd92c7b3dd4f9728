"""A Responses request as the chat request it runs as: its conversation as chat messages, its settings as
the chat fields they mean.

    instructions, input            ->  a system message, then the input: a string is the user's message;
                                       message items (user / system / developer / assistant; input_text and
                                       output_text parts) as messages (a developer one stays one: chat's
                                       rendering merges it with the system ones, as vLLM's), function_call
                                       items as the assistant's tool_calls, function_call_output items as
                                       role "tool" messages,
                                       reasoning items as an assistant message's reasoning (the one before
                                       it if it has none, else a new one that what follows joins: vLLM's),
                                       item_reference items as the stored output item they name (responses.py
                                       resolves them first); a last assistant message in_progress or
                                       incomplete is continued (vLLM's)
    tools (function), tool_choice, parallel_tool_calls  ->  the same chat fields (tool_choice allowed_tools:
                                       only the tools it names, and its mode)
    max_output_tokens, temperature, top_p  ->  max_tokens, temperature, top_p
    (none)                         ->  min_p 0: vLLM's Responses takes no min_p, not even the generation
                                       config's default, which chat's unset min_p would take
    text.format text / json_object / json_schema  ->  response_format
    reasoning.effort               ->  reasoning_effort
"""
from typing import Any

from pagedllm.chat_template import ChatTemplateError, tool_call_arguments
from pagedllm.server.errors import APIError
from pagedllm.server.protocol import ChatCompletionRequest, validated
from pagedllm.server.responses_request import (_LOGPROBS, AllowedTools, ContentPart, InputItem, ResponsesRequest,
                                               _decode_reasoning, _SameAsChat)


def to_chat(req: ResponsesRequest, messages: list[dict]) -> ChatCompletionRequest:
    """The chat request of req, whose conversation is messages (_messages)."""
    body: dict[str, Any] = {"model": req.model, "messages": messages, "stream": bool(req.stream)}
    last = req.input[-1] if isinstance(req.input, list) else None
    if (last is not None and (last.type or "message") == "message" and last.role == "assistant"
            and last.status in ("in_progress", "incomplete")):
        # vLLM's partial message (Anthropic's prefill): the answer continues it, not a new assistant turn
        body.update(add_generation_prompt=False, continue_final_message=True)
    body["min_p"] = 0.0   # vLLM's Responses never applies a min_p, the generation config's included
    for ours, theirs in (("max_tokens", "max_output_tokens"), *((f, f) for f in _SameAsChat.model_fields)):
        if getattr(req, theirs) is not None:
            body[ours] = getattr(req, theirs)
    if req.tools:
        body["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                         for t in req.tools]
    if isinstance(req.tool_choice, AllowedTools):   # chat's shape of it, which chat honours
        body["tool_choice"] = {"type": "allowed_tools", "allowed_tools": {"mode": req.tool_choice.mode, "tools": [
            {"type": "function", "function": {"name": name}} for name in _allowed_names(req.tool_choice, req)]}}
    # Responses' default "auto" with no tools means none, where chat refuses it (vLLM's 400): it is left out
    elif req.tool_choice is not None and (req.tools or req.tool_choice != "auto"):
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
    for i, item in enumerate(req.input):
        at = f"input.{i}"
        kind = item.type or "message"
        last = messages[-1] if messages and messages[-1]["role"] == "assistant" else None
        if kind == "reasoning":
            # vLLM's: the assistant message before it takes it if it has none; else it opens one (which the
            # message or calls after it join)
            thought = _reasoning_text(item, at)
            if last is not None and last.get("reasoning") is None:
                last["reasoning"] = thought
            else:
                messages.append({"role": "assistant", "content": None, "reasoning": thought})
        elif kind == "function_call":
            if not item.call_id or not item.name:
                raise APIError(400, f"{at}: a function_call needs call_id and name", at, "invalid_value")
            try:   # refused here, naming the item: rendering would name the chat message it becomes
                tool_call_arguments(item.arguments, f"{at}.arguments")
            except ChatTemplateError as e:
                raise APIError(400, str(e), e.param, "invalid_value") from e
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments or "{}"}}
            if last is not None:   # the turn's text and calls: one message
                last.setdefault("tool_calls", []).append(call)
                continue
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if not item.call_id or item.output is None:
                raise APIError(400, f"{at}: a function_call_output needs call_id and output", at, "invalid_value")
            output = item.output if isinstance(item.output, str) else _text_parts(item.output, f"{at}.output")
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": output})
            continue
        else:
            if item.role is None or item.content is None:
                raise APIError(400, f"{at}: a message needs role and content", at, "invalid_value")
            if isinstance(item.content, str):
                content = item.content
            elif item.role == "assistant":   # vLLM makes it a string (of its first part only; here all its parts)
                content = "\n".join(_texts(item.content, f"{at}.content"))
            else:
                content = _text_parts(item.content, f"{at}.content")
            if item.role == "assistant" and last is not None and last.get("content") is None:
                last["content"] = content   # after its reasoning (or calls): one message, as vLLM's
                continue
            # a developer message stays one, as vLLM's Responses path gives it to the renderer: the chat template
            # takes it, or (most) it becomes a system message merged with the others into one first one
            messages.append({"role": item.role, "content": content})
    return messages



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


def _text_parts(parts: list[ContentPart], at: str) -> list[dict]:
    """A message's (or a function_call_output's) parts as chat's text parts: vLLM gives them to the renderer as
    they are, which leaves an empty one out of the string content format's join and gives an openai-format
    template each part."""
    return [{"type": "text", "text": text} for text in _texts(parts, at)]


def _texts(parts: list[ContentPart], at: str) -> list[str]:
    """The parts' texts; a message's are joined by newlines, as chat's content parts (and vLLM's) are."""
    for j, p in enumerate(parts):
        if p.type not in ("input_text", "output_text", "reasoning_text") or p.text is None:
            raise APIError(400, f"{at}.{j}: {p.type} content is not supported (the models served take text)",
                           f"{at}.{j}", "unsupported_parameter")
    return [p.text for p in parts]



def _allowed_names(choice: AllowedTools, req: ResponsesRequest) -> list[str]:
    """The functions tool_choice allowed_tools names, each {"type": "function", "name": ...} of a function in
    tools (else a 400 naming it, in the client's shape, before chat's own check of chat's shape)."""
    names = [t.name for t in req.tools or []]
    for j, allowed in enumerate(choice.tools):
        if allowed.get("type") != "function" or allowed.get("name") not in names or len(allowed) != 2:
            raise APIError(400, f"tool_choice.tools.{j} must be {{\"type\": \"function\", \"name\": ...}} naming "
                           f"a function in tools ({', '.join(names)}): only function tools are served",
                           f"tool_choice.tools.{j}", "invalid_value")
    return [allowed["name"] for allowed in choice.tools]
