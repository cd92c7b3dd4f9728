"""POST /v1/completions: prompts (text, token ids, or lists of either) in; choices, usage, SSE chunks out.

Choice index = prompt index * n + sequence index, as OpenAI's.
"""
import asyncio
import time
import uuid
from dataclasses import replace
from itertools import islice

from fastapi import Request
from fastapi.responses import Response

from pagedllm.engine.input_processor import truncate_prompt
from pagedllm.engine.output_processor import OutputKind
from pagedllm.engine.tokenizer import num_added_tokens
from pagedllm.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from pagedllm.sampling_params import SamplingParams
from pagedllm.server import reasoning
from pagedllm.server.errors import APIError
from pagedllm.server.protocol import CompletionRequest
from pagedllm.server.request_metrics import streamed, timing_metrics
from pagedllm.server.serving import (SSEResponse, ServingContext, abort_all, add_requests, final_outputs, json_str,
                                     json_value, merge, open_stream, response_id_for, sse, sse_prefix,
                                     until_disconnect, usage, answer_usage, cached_details, fingerprint,
                                     fingerprint_json)
from pagedllm.server.structured_fields import constraint_field


async def create_completion(ctx: ServingContext, req: CompletionRequest, raw_request: Request):
    lora = await ctx.resolve_model(req.model)
    if req.return_tokens_as_token_ids is None:   # the server's --return-tokens-as-token-ids
        req.return_tokens_as_token_ids = ctx.return_tokens_as_token_ids
    req._force_usage = ctx.enable_force_include_usage
    prompts = await _prompts(ctx, req.prompt, req.add_special_tokens)   # (text or None, token ids)
    reasoning.check_budget(ctx.reasoning_parser, req.thinking_token_budget, req.use_beam_search)
    # vLLM truncates a text as its tokenizer does: the BOS the tokenizer adds stays (as offline: InputProcessor);
    # with truncation_side given, it cuts the tokens the tokenizer gave instead, so a BOS goes with the left end
    added = (num_added_tokens(ctx.tokenizer) if req.truncate_prompt_tokens is not None and req.add_special_tokens
             and req.truncation_side is None else (0, 0))
    kept = [truncate_prompt(ids, req.truncate_prompt_tokens, ctx.engine.max_model_len, req.truncation_side or "left",
                            added if text is not None else (0, 0))
            for text, ids in prompts]   # the tokens the engine runs
    # echo with max_tokens 0 (vLLM's, what lm-eval's loglikelihood sends): the prompt scored, nothing generated.
    # The engine samples one token (a step always does), which the response leaves out.
    echo_only = req.echo and req.max_tokens == 0 and not req.use_beam_search
    if echo_only and req.min_tokens:   # the one token sampled inside is dropped: no min_tokens can hold
        raise APIError(400, f"min_tokens must be 0 with max_tokens 0 (echo: the prompt alone), got {req.min_tokens}",
                       "min_tokens", "invalid_value")
    max_tokens = 1 if echo_only else req.max_tokens
    for ids in kept:
        ctx.check_context_length(len(ids), max_tokens, "prompt", "max_tokens")
    max_tokens = ctx.capped_max_tokens(max_tokens)
    num_prompt = sum(len(ids) for ids in kept)
    prompt_logprobs = req.prompt_logprobs
    if prompt_logprobs is None and req.echo and req.logprobs is not None:   # echo's prompt tokens need them
        prompt_logprobs = req.logprobs
    # A constraint is parsed here (up to ~1 s for a 100 kB schema), then remembered: off the event loop.
    # beam search caps max_tokens at each prompt's room itself
    params = (req.to_beam_search_params(ctx.capped_max_tokens(req.max_tokens), ctx.engine.max_model_len)
              if req.use_beam_search else
              await ctx.off_loop_if(constraint_field(req) is not None, req.to_sampling_params, max_tokens,
                                    req.logprobs, prompt_logprobs, defaults=ctx.engine.default_sampling_params))
    if ctx.reasoning_parser is not None and isinstance(params, SamplingParams):   # each prompt's own reasoning
        params = [_thinking(ctx, req, params, ids) for ids in kept]
    request_id = f"cmpl-{uuid.uuid4().hex}"
    response_id = response_id_for("cmpl-", raw_request, req.request_id, request_id)
    kind = OutputKind.DELTA if req.stream else OutputKind.FINAL
    streams, ids = add_requests(ctx.engine, request_id, kept, params, kind, lora, req.priority,
                                req.cache_salt, ctx.request_logger)
    if echo_only:
        streams = [_without_generation(s) for s in streams]
    # the echoed text; with return_token_ids none, as vLLM's (the prompt comes as its prompt_token_ids instead)
    echoed = req.echo and not req.return_token_ids
    texts = [(text if text is not None else ctx.tokenizer.decode(ids)) if echoed else "" for text, ids in prompts]
    # The echoed prompt's first token has no logprob; its token is its decoding, special or not, as vLLM's
    # (a text prompt's BOS is "<s>" there, though the echoed text is the prompt as sent)
    firsts = ([ctx.tokenizer.decode(ids[:1]) for ids in kept] if req.echo and req.logprobs is not None
              else [""] * len(prompts))
    if req.stream:
        outputs = await open_stream(raw_request, ctx.engine, ids, merge(streams), constraint_field(req))
        if isinstance(outputs, Response):   # the client left
            return outputs
        return SSEResponse(ctx.engine, ids, _stream(ctx, req, response_id, texts, num_prompt, outputs, firsts),
                           constraint_field(req))
    return await until_disconnect(raw_request, _full(ctx, req, response_id, texts, streams, ids, firsts))


async def _without_generation(outputs):
    """A request's outputs with its sampled token left out (echo_only): no text, ids or logprobs of its own;
    finished as "length", the limit of 0 tokens."""
    async for out in outputs:
        out.outputs = [replace(c, text="", token_ids=[], cumulative_logprob=None, stop_reason=None,
                               logprobs=None if c.logprobs is None else [],
                               finish_reason=c.finish_reason and "length") for c in out.outputs]
        yield out


def _thinking(ctx: ServingContext, req: CompletionRequest, params: SamplingParams, prompt_ids: list[int]
              ) -> SamplingParams:
    """With a reasoning parser, as vLLM: unless the prompt closed its thinking block, a constraint holds from the
    end of the output's reasoning, and thinking_token_budget counts the tokens of the block `<think>` opens
    (mistral: where the prompt opened a `[THINK]`; else a constraint holds from the first token where the prompt
    holds a `[THINK]`, and lets the first token decide ([THINK] or the constraint's) where it holds none, and
    without one the budget counts a block the output opens)."""
    thinks = reasoning.starts_in_reasoning(ctx.reasoning_parser, None, prompt_ids, ctx.think_ids, ctx.turn_id)
    return replace(params, **reasoning.reasoning_fields(ctx.reasoning_parser, thinks,
                                                        params.structured_outputs is not None, ctx.think_ids,
                                                        req.thinking_token_budget, prompt_ids))


async def _prompts(ctx: ServingContext, prompt, add_special_tokens: bool) -> list[tuple[str | None, list[int]]]:
    if not prompt:   # "" too, as vLLM's 400 (it ran BOS alone); a list item with no tokens is the engine's 400
        raise APIError(400, "prompt must not be empty", "prompt", "invalid_value")
    if isinstance(prompt, str) or isinstance(prompt[0], int):
        prompt = [prompt]
    ids = await asyncio.gather(*(ctx.encode(p, add_special_tokens) for p in prompt if isinstance(p, str)))
    texts = iter(ids)
    return [(p, next(texts)) if isinstance(p, str) else (None, p) for p in prompt]


async def _full(ctx, req: CompletionRequest, request_id: str, texts: list[str], streams, ids,
                firsts: list[str]) -> dict:
    try:
        outputs = await final_outputs(streams, constraint_field(req))
    finally:
        abort_all(ctx.engine, ids)
    choices = []
    # every key of vLLM's choice, null where it has no value; prompt_logprobs when they were run (asked, or echo's)
    run = req.prompt_logprobs is not None or (req.echo and req.logprobs is not None)
    for i, out in enumerate(outputs):
        prompt_logprobs = prompt_logprobs_json(out) if run else None   # the prompt's, alike in its n choices
        for c in out.outputs:
            choices.append(_choice(req, i * req.n + c.index, texts[i], out, c, echo=req.echo, offset=0,
                                   first_token_text=firsts[i]))
            choices[-1].update(token_ids=list(c.token_ids) if req.return_token_ids else None,
                               prompt_logprobs=prompt_logprobs,
                               prompt_token_ids=out.prompt_token_ids if req.return_token_ids else None,
                               routed_experts=None)
    num_prompt = sum(len(o.prompt_token_ids) for o in outputs)
    num_completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    details = cached_details(ctx, sum(o.num_cached_tokens for o in outputs))
    # null unless one sequence: vLLM's, the timings would be one sequence's
    timed = ctx.enable_per_request_metrics and len(outputs) == 1 and req.n == 1
    # every key of vLLM's answer (its response model dumped whole), null where it has no value
    return {"id": request_id, "object": "text_completion", "created": int(time.time()),
            "model": ctx.served_name(req.model),   # the adapter's name under an adapter (vLLM's)
            "choices": choices, "service_tier": None, "system_fingerprint": ctx.system_fingerprint,
            "usage": answer_usage(usage(num_prompt, num_completion, details)),
            "kv_transfer_params": outputs[0].kv_transfer_params if outputs else None, "ec_transfer_params": None,
            "metrics": timing_metrics(outputs[0].metrics, num_completion) if timed else None}


async def _stream(ctx, req: CompletionRequest, request_id: str, texts: list[str], num_prompt: int, outputs,
                  firsts: list[str]):
    created, num_completion = int(time.time()), 0
    started: set[int] = set()
    # Each choice's next chunk's first text offset (logprobs). vLLM's: the length of the text streamed so far,
    # while within a chunk the offsets add up its tokens' strings, which need not be the text (a byte token's
    # "\ufffd" before its character is whole, a "token_id:<id>" name). With echo, vLLM's text so far leaves the
    # echoed prompt out: its offsets would start over after the first chunk, lower than those before them. There
    # the first chunk's token strings go on being added up, as the non-streamed answer's offsets are.
    offsets: dict[int, int] = {}
    head = {"id": request_id, "object": "text_completion", "created": created, "model": ctx.served_name(req.model)}
    prefix = sse_prefix(head)
    plain = req.logprobs is None and not req.echo and not req.return_token_ids   # a choice is its text alone
    continuous, counts = req.continuous_usage, {}   # each choice's tokens so far (continuous_usage_stats)
    tail = ""   # after the choices: the chunk's usage with continuous_usage_stats (vLLM's)
    # vLLM's: a choice's last chunk carries the fingerprint, unless a usage chunk ends the stream (it has it then)
    last = "" if req.include_usage else fingerprint_json(ctx)
    cached: dict[int, int] = {}   # each prompt's tokens found in the prefix cache
    prompt_logprobs: dict[int, list] = {}   # each prompt's, from its first output (DELTA's only one with them)
    metrics = None   # the last output's timings (--enable-per-request-metrics)
    async for i, out in outputs:
        cached[i], metrics = out.num_cached_tokens, out.metrics
        if out.prompt_logprobs:
            prompt_logprobs[i] = out.prompt_logprobs
        elif i in prompt_logprobs:   # a choice whose first token comes later echoes them too
            out.prompt_logprobs = prompt_logprobs[i]
        for c in out.outputs:
            index = i * req.n + c.index
            num_completion += len(c.token_ids)
            if continuous:
                counts[index] = counts.get(index, 0) + len(c.token_ids)
                tail = f',"usage":{json_value(usage(len(out.prompt_token_ids), counts[index]))}'
            end = tail + last if c.finish_reason is not None else tail
            if plain:   # the choice's fields as they are: no _choice dict for every stream's every step
                choice_json = _choice_json(index, c.text, None, c.finish_reason, c.stop_reason, None, None)
                yield f"{prefix}{choice_json}]{end}}}\n\n"
                continue
            first = index not in started
            started.add(index)
            choice = _choice(req, index, texts[i], out, c, req.echo and first, offsets.get(index, 0), firsts[i])
            if choice["logprobs"] is not None and not req.echo:
                offsets[index] = offsets.get(index, 0) + len(c.text)
            elif choice["logprobs"] is not None and choice["logprobs"]["tokens"]:
                offsets[index] = choice["logprobs"]["text_offset"][-1] + len(choice["logprobs"]["tokens"][-1])
            # vLLM's: the prompt's ids in a choice's first chunk, each chunk its new ids; both null unless asked
            # (its stream choice sets the two fields always, so they are sent, null or not). An echoed choice's
            # first chunk has the prompt's ids too, asked or not: vLLM's echo is where it returns them.
            asked = req.return_token_ids
            choice.update(prompt_token_ids=out.prompt_token_ids if first and (asked or req.echo) else None,
                          token_ids=list(c.token_ids) if asked else None)
            # sse({**head, "choices": [choice], [usage], [system_fingerprint]})
            yield f"{prefix}{_choice_json(**choice)}]{end}}}\n\n"
    if req.include_usage:
        details = cached_details(ctx, sum(cached.values()))
        timings = {}   # vLLM's: on this chunk only, for one prompt's one sequence
        if ctx.enable_per_request_metrics and len(texts) == 1 and req.n == 1:
            timings = {"metrics": streamed(timing_metrics(metrics, num_completion))}
        yield sse({**head, "choices": [], "usage": usage(num_prompt, num_completion, details), **fingerprint(ctx),
                   **timings})


def _choice(req: CompletionRequest, index: int, prompt_text: str, out: RequestOutput, c: CompletionOutput,
            echo: bool, offset: int, first_token_text: str = "") -> dict:
    logprobs = None
    if req.logprobs is not None:
        as_ids = req.return_tokens_as_token_ids
        entries = _prompt_entries(out, req.logprobs, as_ids, first_token_text) if echo else []
        named = bool(req.logprob_token_ids)   # the chosen token and those ids, all shown (vLLM's)
        entries += [_entry(lp if named else lp and _top(lp, req.logprobs), tid, as_ids)
                    for tid, lp in zip(c.token_ids, c.logprobs or [])]
        logprobs = _completion_logprobs(entries, offset)
    return {"index": index, "text": (prompt_text if echo else "") + c.text, "logprobs": logprobs,
            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}


def _choice_json(index: int, text: str, logprobs: dict | None, finish_reason: str | None,
                 stop_reason: int | str | None, prompt_token_ids: list[int] | None,
                 token_ids: list[int] | None) -> str:
    """json.dumps of a streamed choice (a _choice's fields in its order, then return_token_ids' two), compact (see
    serving.sse_prefix)."""
    return (f'{{"index":{index},"text":{json_str(text)},"logprobs":{json_value(logprobs)},'
            f'"finish_reason":{json_value(finish_reason)},"stop_reason":{json_value(stop_reason)},'
            f'"prompt_token_ids":{json_value(prompt_token_ids)},"token_ids":{json_value(token_ids)}}}')


def _entry(lp: PositionLogprobs | None, token_id: int, as_ids: bool = False) -> tuple[str, float | None, dict | None]:
    """as_ids (return_tokens_as_token_ids, vLLM's): tokens named "token_id:<id>", as text may not be JSON-safe
    (a byte token); the text offsets then count those names, as vLLM's do."""
    if lp is None:   # the first prompt token has no logprob (_prompt_entries gives it its text)
        return f"token_id:{token_id}" if as_ids else "", None, None
    # top: in the position's order (vLLM's): the chosen token, then the top ones by rank (or logprob_token_ids')
    if as_ids:
        return f"token_id:{token_id}", json_logprob(lp[token_id].logprob), {
            f"token_id:{tid}": json_logprob(p.logprob) for tid, p in lp.items()}
    chosen = lp[token_id]
    top: dict[str, float] = {}
    for p in lp.values():   # tokens of the same text: the likeliest's logprob, where the first one stood
        value = json_logprob(p.logprob)
        if top.get(p.decoded_token, value) <= value:
            top[p.decoded_token] = value
    return chosen.decoded_token, json_logprob(chosen.logprob), top


def json_logprob(logprob: float) -> float:
    """A logprob as JSON can carry it: -inf (a token a constraint, allowed_token_ids or bad_words ruled out, among
    the top-N) becomes -9999.0, as vLLM's; JSON has no infinity."""
    return max(logprob, -9999.0)


def _prompt_entries(out: RequestOutput, num_top: int, as_ids: bool = False, first_token_text: str = "") -> list:
    """num_top: the request's logprobs. Each position shows the first num_top + 1 of its entries (its token, then
    the top ones), as vLLM's: where the token is among the top num_top and prompt_logprobs ran more, that is one
    more than a generated position shows (the rest stay in the choice's prompt_logprobs).
    first_token_text: the text of the first prompt token, which has no logprob entry to name it."""
    positions = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
    entries = [_entry(lp and _top(lp, num_top), tid, as_ids) for tid, lp in zip(out.prompt_token_ids, positions)]
    if entries and not as_ids:
        entries[0] = (first_token_text, None, None)
    return entries


def _top(lp: PositionLogprobs, num_top: int) -> PositionLogprobs:
    """vLLM's: a position shows its first num_top + 1 entries (its token, then the top ones). A sampled position
    holds no more; a prompt position run with a larger prompt_logprobs, or a beam search's, may."""
    return lp if len(lp) <= num_top + 1 else dict(islice(lp.items(), num_top + 1))


def prompt_logprobs_json(out: RequestOutput) -> list[dict | None]:
    """vLLM's prompt_logprobs: per prompt token (the first has none), token id -> logprob, rank, decoded token.
    -inf becomes -9999.0, as vLLM's: JSON has no infinity."""
    return [None if position is None else
            {str(tid): {"logprob": json_logprob(p.logprob), "rank": p.rank, "decoded_token": p.decoded_token}
             for tid, p in position.items()}
            for position in out.prompt_logprobs or [None] * len(out.prompt_token_ids)]


def _completion_logprobs(entries: list, offset: int) -> dict:
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for token, logprob, top in entries:
        tokens.append(token)
        token_logprobs.append(logprob)
        top_logprobs.append(top)
        text_offset.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offset}

