"""POST /v1/chat/completions: messages through the chat template; choices, usage, SSE chunks out."""
import json
import time
import uuid
from dataclasses import replace
from itertools import islice

from fastapi import Request
from fastapi.responses import Response

from pagedllm import chat_template
from pagedllm.engine.input_processor import truncate_prompt
from pagedllm.engine.output_processor import OutputKind
from pagedllm.outputs import CompletionOutput, Logprob
from pagedllm.sampling_params import SamplingParams
from pagedllm.server import chat_tools, reasoning
from pagedllm.server.chat_tools import ToolPlan
from pagedllm.server.completions import json_logprob, prompt_logprobs_json
from pagedllm.server.errors import APIError, shorten
from pagedllm.server.protocol import ChatCompletionRequest, TokenizeRequest
from pagedllm.server.reasoning import ReasoningParser
from pagedllm.server.request_metrics import streamed, timing_metrics
from pagedllm.server.serving import (SSEResponse, ServingContext, abort_all, add_requests, final_outputs, json_str,
                                     json_value, merge, open_stream, response_id_for, sse, sse_prefix,
                                     until_disconnect, usage, answer_usage, cached_details, created_cache_tokens,
                                     fingerprint, fingerprint_json)
from pagedllm.server.structured_fields import checked_constraint, constraint_field
from pagedllm.server.tool_parsers.forced import parameters_schema
from pagedllm.structured_output.grammar_spec import validate
from pagedllm.structured_output.params import StructuredOutputsParams


async def render_chat(ctx: ServingContext, req: ChatCompletionRequest | TokenizeRequest) -> tuple[str, list[int]]:
    """The request's messages through the chat template, with its options (as LLM.chat): the text and its
    token ids. The template on the tokenizer thread, the text batched with other requests' (ServingContext.encode)."""
    text = await ctx.off_loop(_chat_text, ctx, req)
    # The template already holds any BOS token: no special tokens added again unless asked (vLLM's default).
    return text, await ctx.encode(text, req.add_special_tokens)


def _chat_text(ctx: ServingContext, req: ChatCompletionRequest | TokenizeRequest) -> str:
    # An empty chat_template is none (vLLM's `request.chat_template or default`), though still refused untrusted.
    template = req.chat_template or ctx.chat_template
    if req.chat_template is not None and not ctx.trust_request_chat_template:
        raise APIError(400, "a request's own chat_template needs the server to run with "
                            "--trust-request-chat-template", "chat_template", "invalid_value")
    if template is None and not getattr(ctx.tokenizer, "chat_template", None):
        raise APIError(400, "this model's tokenizer has no chat template: start the server with --chat-template",
                       "messages", "invalid_value")
    # The template gets no tools (None) when the request has none, an empty list when it sends one (/tokenize), as
    # vLLM; --exclude-tools-when-tool-choice-none: the template is not told of tools it may not call.
    tools = None if req.tools is None else [req.tools[i] for i in req.shown_tools()] \
        if isinstance(req, ChatCompletionRequest) else req.tools
    if ctx.exclude_tools_when_tool_choice_none and getattr(req, "tool_choice", None) == "none":
        tools = None
    tools = None if tools is None else [t.as_template_input() for t in tools]
    if isinstance(req, ChatCompletionRequest) and req.echo:   # the echo joins the parts as that format holds them
        req._content_format = chat_template.content_format(ctx.tokenizer, template, tools,
                                                           ctx.chat_template_content_format)
    try:
        text = chat_template.render_chat(ctx.tokenizer, [m.as_template_input() for m in req.messages], template,
                                         req.add_generation_prompt, req.continue_final_message,
                                         template_kwargs(ctx, req), tools, req.documents,
                                         ctx.chat_template_content_format)
    except chat_template.ChatTemplateError as e:
        raise APIError(400, shorten(str(e), 1000), e.param, "invalid_value") from e
    return text


def template_kwargs(ctx: ServingContext, req: ChatCompletionRequest | TokenizeRequest) -> dict | None:
    """The template's variables: the request's over --default-chat-template-kwargs. A request value null or "auto"
    counts as unset, as vLLM's merge takes it (the server's default, if any, stays; else the template has none)."""
    given = {k: v for k, v in (req.template_kwargs() or {}).items()
             if v is not None and not (isinstance(v, str) and v == "auto")}
    return {**(ctx.default_chat_template_kwargs or {}), **given} or None


def _kept_and_max_tokens(ctx: ServingContext, req: ChatCompletionRequest, prompt_ids: list[int]):
    """The prompt ids kept (truncate_prompt_tokens) and the request's max_tokens resolved (unset: the generation
    config's, None for up to max_model_len; within the server's cap), the context checked."""
    max_tokens_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = getattr(req, max_tokens_param)
    kept = truncate_prompt(prompt_ids, req.truncate_prompt_tokens, ctx.engine.max_model_len,
                           req.truncation_side or "left")
    if max_tokens is None:
        max_tokens = ctx.default_max_tokens(len(kept))
    ctx.check_context_length(len(kept), max_tokens, "messages", max_tokens_param)
    return kept, ctx.capped_max_tokens(max_tokens)


async def run_limit(ctx: ServingContext, req: ChatCompletionRequest) -> int:
    """The limit of output tokens the request will run to (create_chat_completion's req._max_tokens), before it
    runs: its prompt rendered, the context checked (an APIError as create_chat_completion raises it)."""
    _, prompt_ids = await render_chat(ctx, req)
    kept, max_tokens = _kept_and_max_tokens(ctx, req, prompt_ids)
    return max_tokens or ctx.engine.max_model_len - len(kept)


async def create_chat_completion(ctx: ServingContext, req: ChatCompletionRequest, raw_request: Request):
    lora = await ctx.resolve_model(req.model)
    if req.return_tokens_as_token_ids is None:   # the server's --return-tokens-as-token-ids
        req.return_tokens_as_token_ids = ctx.return_tokens_as_token_ids
    req._force_usage = ctx.enable_force_include_usage
    plan = chat_tools.plan_tools(req, ctx.tool_call_parser, ctx.enable_auto_tool_choice)
    prompt_text, prompt_ids = await render_chat(ctx, req)
    if not prompt_ids:   # the engine's own refusal would name `prompt`, which a chat request has not
        raise APIError(400, "the chat template rendered these messages as an empty prompt", "messages",
                       "invalid_value")
    kept, max_tokens = _kept_and_max_tokens(ctx, req, prompt_ids)
    if req.top_logprobs and not req.logprobs:   # 0 asks for none: vLLM's default, accepted without logprobs
        raise APIError(400, "top_logprobs needs logprobs to be true", "top_logprobs", "invalid_value")
    if req.use_beam_search:
        _refuse_tool_constraint(plan, "beam search does not take one")
        params = req.to_beam_search_params(max_tokens, ctx.engine.max_model_len)
    else:
        # A constraint is parsed here (up to ~1 s for a 100 kB schema), then remembered: off the event loop.
        slow = constraint_field(req) is not None or plan.choice in ("named", "required")   # tools enforced
        try:
            params = await ctx.off_loop_if(slow, lambda: checked_constraint(_with_tools(
                req.to_sampling_params(max_tokens, (req.top_logprobs or 0) if req.logprobs else None,
                                       _prompt_logprobs(req), defaults=ctx.engine.default_sampling_params), plan)))
        except ValueError as e:
            raise _as_sent(e, req, plan) from e
    sampling = isinstance(params, SamplingParams)   # not beam search
    req._params, req._max_tokens = params, max_tokens or ctx.engine.max_model_len - len(kept)
    constrained = sampling and params.structured_outputs is not None
    thinks = _thinks(ctx, req, kept, constrained)
    if thinks is not None and sampling:
        # a constraint applies from the end of the reasoning, which a budget may force (vLLM's)
        params = replace(params, **reasoning.reasoning_fields(ctx.reasoning_parser, thinks, constrained,
                                                              ctx.think_ids, req.thinking_token_budget, kept,
                                                              req.include_reasoning))
        if reasoning.reads_special_tokens(ctx.reasoning_parser):   # its tags must reach the text
            params = replace(params, skip_special_tokens=False)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    response_id = response_id_for("chatcmpl-", raw_request, req.request_id, request_id)
    kind = OutputKind.DELTA if req.stream else OutputKind.FINAL
    try:   # the engine's checks (the vocabulary's and logprobs' bounds) name SamplingParams' fields
        streams, ids = add_requests(ctx.engine, request_id, [prompt_ids], params, kind, lora, req.priority,
                                    req.cache_salt, ctx.request_logger)
    except ValueError as e:
        raise _as_sent(e, req, plan) from e
    if req.stream:
        outputs = await open_stream(raw_request, ctx.engine, ids, merge(streams), _constraint_field(req, plan))
        if isinstance(outputs, Response):   # the client left
            return outputs
        return SSEResponse(ctx.engine, ids, _stream(ctx, req, plan, response_id, kept, outputs, thinks,
                                                    prompt_text), _constraint_field(req, plan))
    return await until_disconnect(raw_request, _full(ctx, req, plan, response_id, streams, ids, thinks, prompt_text))


def _as_sent(e: ValueError, req: ChatCompletionRequest, plan: ToolPlan) -> Exception:
    """A SamplingParams error about a value that chat takes under another name: max_completion_tokens (when set,
    SamplingParams' max_tokens), top_logprobs (SamplingParams' logprobs), a tool's parameters schema (the
    constraint tool_choice required or named makes of it). Others keep their message (the ValueError handler
    names the field)."""
    message = str(e)
    if message.startswith("SamplingParams.max_tokens") and req.max_completion_tokens is not None:
        return APIError(400, message.replace("SamplingParams.max_tokens", "max_completion_tokens", 1),
                        "max_completion_tokens", "invalid_value")
    if message.startswith("SamplingParams.logprobs") and req.top_logprobs is not None:
        return APIError(400, message.replace("SamplingParams.logprobs", "top_logprobs", 1), "top_logprobs",
                        "invalid_value")
    if message.startswith("SamplingParams.structured_outputs") and constraint_field(req) is None \
            and plan.choice in ("required", "named"):
        param = _bad_tool(plan)
        return APIError(400, f"{param}: {message.split(': ', 1)[-1]}", param, "invalid_value")
    return e


def _bad_tool(plan: ToolPlan) -> str:
    """tools.<i>.function.parameters of the first tool whose parameters schema is refused alone ("tools" if
    none is: then only their combination was)."""
    for i, tool in enumerate(plan.tools):
        if plan.choice == "named" and tool["function"]["name"] != plan.name:
            continue
        try:
            validate(StructuredOutputsParams(json=parameters_schema(tool), disable_any_whitespace=True))
        except ValueError:
            return f"tools.{plan.at[i]}.function.parameters"
    return "tools"


def _thinks(ctx, req: ChatCompletionRequest, prompt_ids: list[int], constrained: bool) -> bool | None:
    """With a reasoning parser (None without): whether the answer opens with reasoning. Not when qwen3's
    thinking is off (enable_thinking), when the prompt closed the block, nor when a constraint is asked for
    without the reasoning (include_reasoning false): that constraint holds from the first token (vLLM's).
    Without include_reasoning, what would show the reasoning's tokens is refused."""
    reasoning.check_budget(ctx.reasoning_parser, req.thinking_token_budget, req.use_beam_search)
    if ctx.reasoning_parser is None:
        return None
    if not req.include_reasoning:
        for name, asked in (("logprobs", req.logprobs), ("return_token_ids", req.return_token_ids)):
            if asked:
                raise APIError(400, f"{name} cannot be combined with include_reasoning false: they would show "
                                    f"the reasoning's tokens", name, "invalid_value")
    return (reasoning.starts_in_reasoning(ctx.reasoning_parser, template_kwargs(ctx, req), prompt_ids, ctx.think_ids,
                                          ctx.turn_id)
            and not (constrained and not req.include_reasoning))


def _reasoning_parsers(ctx, req: ChatCompletionRequest, plan: ToolPlan, thinks: bool | None
                       ) -> list[ReasoningParser] | None:
    if thinks is None:
        return None
    # the engine constrains the answer from </think> on: the reasoning ends there, where the constraint starts
    constrained = constraint_field(req) is not None or plan.choice in ("named", "required")
    return [ReasoningParser(ctx.reasoning_parser, thinks, constrained) for _ in range(req.n)]


def _with_tools(params, plan: ToolPlan):
    """tool_choice required or a named function: the calls are enforced by structured output. A parser that reads
    special tokens has them kept in the text."""
    if plan.keeps_special_tokens:
        params = replace(params, skip_special_tokens=False)
    constraint = plan.structured_outputs()
    if constraint is None:
        return params
    if params.structured_outputs is not None:
        _refuse_tool_constraint(plan, "it cannot be combined with another structured output constraint")
    return replace(params, structured_outputs=constraint)


def _refuse_tool_constraint(plan: ToolPlan, why: str):
    if plan.choice in ("required", "named"):
        raise APIError(400, f"tool_choice {plan.choice} is enforced by structured output: {why}", "tool_choice",
                       "invalid_value")


def _constraint_field(req: ChatCompletionRequest, plan: ToolPlan) -> str | None:
    """The param of a 400 from the engine's compile: a tool's parameters schema when tools set the constraint."""
    return constraint_field(req) or ("tools" if plan.choice in ("required", "named") else None)


async def _full(ctx, req: ChatCompletionRequest, plan: ToolPlan, request_id: str, streams, ids,
                thinks: bool | None, prompt_text: str) -> dict:
    try:
        [out] = await final_outputs(streams, _constraint_field(req, plan))
    finally:
        abort_all(ctx.engine, ids)
    choices, echo, role = [], _echo_text(ctx, req), _role(ctx, req)
    thinkers = _reasoning_parsers(ctx, req, plan, thinks)
    for c in out.outputs:
        thought, text = thinkers[c.index].parse_all(c.text) if thinkers else (None, c.text)
        message, finish_reason = chat_tools.message(plan, c, text)
        if echo:
            message["content"] = echo + (message["content"] or "")
        choices.append({"index": c.index, "message": _message(role, message, thought if req.include_reasoning
                                                              else None), "logprobs": _logprobs(req, c),
                        "finish_reason": finish_reason, "stop_reason": c.stop_reason,
                        "token_ids": list(c.token_ids) if req.return_token_ids else None, "routed_experts": None})
    num_completion = sum(len(c.token_ids) for c in out.outputs)
    details = _usage_details(ctx, req, thinks, out.num_cached_tokens, [c.token_ids for c in out.outputs])
    counted = usage(len(out.prompt_token_ids), num_completion, details,
                    _created(ctx, req, len(out.prompt_token_ids), out.num_cached_tokens))
    timed = ctx.enable_per_request_metrics and req.n == 1   # n > 1: null, the timings would be one sequence's
    # Every key of vLLM's answer (its response model dumped whole), null where it has no value; prompt_logprobs
    # are the response's (there is one prompt); prompt_text is the prompt as the chat template wrote it.
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()),
            "model": ctx.served_name(req.model),   # the adapter's name under an adapter (vLLM's)
            "choices": choices, "service_tier": None, "system_fingerprint": ctx.system_fingerprint,
            "usage": counted if req._usage_details else answer_usage(counted),   # /v1/responses reads its own
            "prompt_logprobs": prompt_logprobs_json(out) if out.prompt_logprobs is not None else None,
            "prompt_token_ids": out.prompt_token_ids if req.return_token_ids else None,
            "prompt_text": prompt_text if req.return_prompt_text else None,
            "kv_transfer_params": out.kv_transfer_params, "ec_transfer_params": None,
            "metrics": timing_metrics(out.metrics, num_completion) if timed else None}


def _message(role: str, message: dict, reasoning: str | None) -> dict:
    """The keys of vLLM's ChatMessage dumped whole: OpenAI's refusal, annotations, audio and function_call null (none
    is built here), tool_calls only when there are some (its serializer drops an empty list), reasoning null
    without any."""
    calls = message.get("tool_calls")
    return {"role": role, "content": message["content"], "refusal": None, "annotations": None, "audio": None,
            "function_call": None, **({"tool_calls": calls} if calls else {}), "reasoning": reasoning}


async def _stream(ctx, req: ChatCompletionRequest, plan: ToolPlan, request_id: str, prompt_ids: list[int],
                  outputs, thinks: bool | None, prompt_text: str):
    head = {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()),
            "model": ctx.served_name(req.model)}
    prefix, num_completion = sse_prefix(head), 0
    # return_token_ids (vLLM's): the prompt's ids with each choice's role chunk, and each chunk's new ids;
    # return_prompt_text: the template's text there. Both keys are on every role chunk, null when not asked,
    # as vLLM's (it sets them on that chunk whether asked or not, and sends the fields it set).
    first = {"prompt_token_ids": prompt_ids if req.return_token_ids else None,
             "prompt_text": prompt_text if req.return_prompt_text else None}
    # continuous_usage_stats (vLLM's): each chunk carries its choice's usage so far
    continuous, counts = req.continuous_usage, [0] * req.n
    none_yet = {"usage": usage(len(prompt_ids), 0)} if continuous else {}
    for i in range(req.n):   # OpenAI's first chunk of each choice carries only the role
        yield sse({**head, "choices": [{"index": i, "delta": {"role": _role(ctx, req), "content": ""},
                                        "logprobs": None, "finish_reason": None}], **none_yet, **first})
    echo = _echo_text(ctx, req)
    for i in range(req.n if echo else 0):   # then vLLM's: a chunk with the echoed text
        yield sse({**head, "choices": [{"index": i, "delta": {"content": echo}, "logprobs": None,
                                        "finish_reason": None}], **none_yet})
    parsers = [plan.new_parser() for _ in range(req.n)] if plan.parses else None
    thinkers = _reasoning_parsers(ctx, req, plan, thinks)
    # vLLM's: a server with a tool parser reads every answer's content through it (tool_choice none too)
    tool_server = bool(ctx.enable_auto_tool_choice and ctx.tool_call_parser)
    counted = req._usage_details and thinks is not None
    answers: dict[int, list[int]] = {}   # each choice's token ids, where its reasoning tokens are counted
    num_cached, metrics = 0, None
    # vLLM's: a choice's last chunk carries the fingerprint, unless a usage chunk ends the stream (it has it then)
    last = {} if req.include_usage else fingerprint(ctx)
    last_json = fingerprint_json(ctx) if last else ""   # the same, for the chunks written by hand
    async for _, out in outputs:
        num_cached, metrics = out.num_cached_tokens, out.metrics
        for c in out.outputs:
            num_completion += len(c.token_ids)
            if counted:
                answers.setdefault(c.index, []).extend(c.token_ids)
            so_far = {}
            if continuous:
                counts[c.index] += len(c.token_ids)
                so_far = {"usage": usage(len(prompt_ids), counts[c.index])}
            if parsers is not None or thinkers is not None:
                chunk = _parsed_chunk(req, thinkers and thinkers[c.index], parsers and parsers[c.index], c,
                                      tool_server)
                if chunk is not None:
                    chunk["token_ids"] = list(c.token_ids) if req.return_token_ids else None
                    yield sse({**head, "choices": [chunk], **so_far,
                               **(last if chunk["finish_reason"] is not None else {})})
                continue
            logprobs = _logprobs(req, c)
            delta = f'{{"content":{json_str(c.text)}}}'
            if tool_server and not c.text:   # vLLM's tool parser passes no empty content on (tool_choice none)
                if c.finish_reason is None and logprobs is None and not req.return_token_ids:
                    continue
                delta = "{}"
            ids = json_value(list(c.token_ids)) if req.return_token_ids else "null"
            tail = f',"usage":{json_value(so_far["usage"])}' if so_far else ""
            stop = ""
            if c.finish_reason is not None:
                stop, tail = f',"stop_reason":{json_value(c.stop_reason)}', tail + last_json
            # sse({**head, "choices": [{"index": c.index, "delta": {"content": c.text} or {}, "logprobs": ...,
            #    "finish_reason": ..., ["stop_reason": ...], "token_ids": ...}], [usage], [system_fingerprint]}),
            #    by hand (serving.sse_prefix)
            yield (f'{prefix}{{"index":{c.index},"delta":{delta},'
                   f'"logprobs":{json_value(logprobs)},"finish_reason":{json_value(c.finish_reason)}'
                   f'{stop},"token_ids":{ids}}}]{tail}}}\n\n')
    if req.include_usage:
        details = _usage_details(ctx, req, thinks, num_cached, answers.values())
        timings = {}   # vLLM's: on this chunk only, for one sequence
        if ctx.enable_per_request_metrics and req.n == 1:
            timings = {"metrics": streamed(timing_metrics(metrics, num_completion))}
        yield sse({**head, "choices": [], "usage": usage(len(prompt_ids), num_completion, details,
                                                         _created(ctx, req, len(prompt_ids), num_cached)),
                   **fingerprint(ctx), **timings})


def _usage_details(ctx, req: ChatCompletionRequest, thinks: bool | None, num_cached: int,
                   answers) -> tuple[int, int] | None:
    """usage()'s details for /v1/responses: the prompt tokens found cached, and the reasoning tokens of the
    choices' token ids (answers) under a reasoning parser. A chat request's: the cached tokens alone under
    --enable-prompt-tokens-details (serving.cached_details), else none."""
    if not req._usage_details:
        return cached_details(ctx, num_cached)
    if thinks is None:
        return num_cached, 0
    return num_cached, sum(reasoning.num_reasoning_tokens(ids, ctx.think_ids, thinks) for ids in answers)


def _created(ctx, req: ChatCompletionRequest, num_prompt_tokens: int, num_cached: int) -> int | None:
    """Chat's usage under --enable-prompt-tokens-details also says created_cache_tokens (vLLM 0.26's, beside
    cached_tokens; its completions do not); /v1/responses' (req._usage_details) has no such field."""
    if not ctx.enable_prompt_tokens_details or req._usage_details:
        return None
    return created_cache_tokens(ctx, num_prompt_tokens, num_cached)


async def chunk_dicts(chunks):
    """A chat stream's chunks (its SSEResponse's body_iterator) as dicts, for the APIs served over it
    (anthropic.py, responses.py)."""
    async for raw in chunks:
        if raw.startswith("data: {"):
            yield json.loads(raw[6:])


def _role(ctx: ServingContext, req: ChatCompletionRequest) -> str:
    """The answer's role (vLLM's): the assistant's (--response-role) after a generation prompt; without one the
    model goes on in the last message's turn (continue_final_message), whoever's it is."""
    return ctx.response_role if req.add_generation_prompt else req.messages[-1].role


def _prompt_logprobs(req: ChatCompletionRequest) -> int | None:
    """vLLM's: echo without prompt_logprobs asks for the prompt's, with top_logprobs alternatives (unsent: its
    default 0, each prompt token's own; null: none). A stream carries none: there they are not run (vLLM runs
    them and drops them)."""
    if req.prompt_logprobs is not None or not req.echo or req.stream:
        return req.prompt_logprobs
    return req.top_logprobs if "top_logprobs" in req.model_fields_set else 0


def _echo_text(ctx: ServingContext, req: ChatCompletionRequest) -> str:
    """echo (vLLM's): the last message's text, put before each choice's content when that message is in the
    answer's role (an assistant message, or any continued one); "" otherwise. Its parts' texts joined by
    newlines as the content format the template took them in holds them: "openai" keeps the empty ones, the
    "string" format leaves them out (vLLM's; its stream sends the openai parts as they are, a 500)."""
    if not req.echo:
        return ""
    last = req.messages[-1].as_template_input()
    if last.get("role") != _role(ctx, req):
        return ""
    content = chat_template.template_message(last, req._content_format)["content"]
    return content if isinstance(content, str) else "\n".join(p["text"] for p in content if p["type"] == "text")


def _parsed_chunk(req: ChatCompletionRequest, thinker: ReasoningParser | None, parser, c: CompletionOutput,
                  tool_server: bool = False) -> dict | None:
    """A choice's chunk when its text is read for reasoning (thinker) and/or tool calls (parser, on the
    content); None when the parsers hold it all back (a possible tag, a call's name not yet complete) and
    there is nothing else to send. With return_token_ids such a step still sends its chunk, an empty delta
    with its ids (vLLM's: every token id is in the stream, each in its own step's chunk)."""
    text, delta = c.text, {}
    # once the reasoning is over, vLLM passes each step's text on as content when the server has no tool parser
    # (tool_server), "" too (the EOS that ends the answer): its chunk has `"content": ""`, not an empty delta
    passed_on = thinker is not None and thinker.ended and not tool_server
    if thinker is not None:
        split = thinker.feed(c.text)
        if c.finish_reason is not None:
            split.add(thinker.finish())
        text = split.content
        if split.reasoning and req.include_reasoning:
            delta["reasoning"] = split.reasoning
    if parser is not None:
        tool_delta, finish_reason = chat_tools.stream_delta(parser, c, text)
        delta.update(tool_delta)
    else:
        finish_reason = c.finish_reason
        if text or passed_on:
            delta["content"] = text
    logprobs = _logprobs(req, c)
    if not delta and finish_reason is None and logprobs is None and not req.return_token_ids:
        return None
    chunk = {"index": c.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    if finish_reason is not None:   # only a choice's last chunk has stop_reason (vLLM's)
        chunk["stop_reason"] = c.stop_reason
    return chunk


def _logprobs(req: ChatCompletionRequest, c: CompletionOutput) -> dict | None:
    if not req.logprobs:
        return None
    # vLLM's: the position's first k entries as the engine lists them, the chosen token first, then the top ones
    # by rank (once each): a sampled token outside the top k is listed, ahead of the k-th. All of them with
    # logprob_token_ids (the chosen token, then those ids: vLLM's return_all) or k -1 (the vocabulary)
    k = None if req.logprob_token_ids or req.top_logprobs == -1 else req.top_logprobs or 0
    content = []
    as_ids = req.return_tokens_as_token_ids
    for token_id, position in zip(c.token_ids, c.logprobs or []):
        content.append({**_token(position[token_id], token_id, as_ids),
                        "top_logprobs": [_token(p, tid, as_ids, True) for tid, p in islice(position.items(), k)]})
    return {"content": content}


def _token(p: Logprob, token_id: int, as_ids: bool, alternative: bool = False) -> dict:
    """as_ids (return_tokens_as_token_ids, vLLM's): the token named "token_id:<id>"; the chosen token's bytes stay
    its text's, an alternative's are its name's (vLLM 0.26 encodes the text there, the name here)."""
    text = p.decoded_token or ""
    token = f"token_id:{token_id}" if as_ids else text
    return {"token": token, "logprob": json_logprob(p.logprob),
            "bytes": list((token if alternative else text).encode())}
