"""POST /generative_scoring (vLLM 0.26's): how likely a decoder model finds each of a few label tokens after a
query and an item, for classification and ranking with a generative model.

Each item is one prompt, the query's tokens then the item's (item_first: the other way round; a text query takes
add_special_tokens, a text item none), run for one token with logprob_token_ids = label_token_ids. An item's score
is its first label's probability there: normalised over the labels alone (apply_softmax, the default), or the
model's own over the vocabulary. A prompt past the context is a 400 naming its item (vLLM cuts it short
silently)."""
import math
import time
import uuid

from fastapi import Request
from pydantic import Field

from pagedllm.engine.output_processor import OutputKind
from pagedllm.sampling_params import MAX_LOGPROB_TOKEN_IDS, SamplingParams
from pagedllm.server.errors import APIError
from pagedllm.server.protocol import _Request
from pagedllm.server.serving import ServingContext, abort_all, add_requests, final_outputs, until_disconnect, usage


class GenerativeScoringRequest(_Request):
    model: str | None = None
    query: str | list[int]
    items: list[str] | list[list[int]] = Field(min_length=1)
    label_token_ids: list[int] = Field(min_length=1, max_length=MAX_LOGPROB_TOKEN_IDS)
    apply_softmax: bool = True
    item_first: bool = False
    add_special_tokens: bool = True
    priority: int = 0
    request_id: str | None = None


async def create_generative_scoring(ctx: ServingContext, req: GenerativeScoringRequest, raw_request: Request):
    lora = await ctx.resolve_model(req.model)
    vocab = ctx.engine.input_processor.vocab_size
    query = await ctx.encode(req.query, req.add_special_tokens) if isinstance(req.query, str) else req.query
    _check_ids(query, vocab, "query")
    prompts = []
    for i, item in enumerate(req.items):
        ids = await ctx.encode(item, False) if isinstance(item, str) else item
        _check_ids(ids, vocab, f"items.{i}")
        prompts.append(ids + query if req.item_first else query + ids)
        if not prompts[-1]:
            raise APIError(400, f"items.{i} and query are both empty: there is nothing to score", f"items.{i}",
                           "invalid_value")
        ctx.check_context_length(len(prompts[-1]), 1, f"items.{i}", "items")
    try:   # the label ids' range, the engine's check
        params = SamplingParams(temperature=0.0, max_tokens=1, logprob_token_ids=req.label_token_ids)
        params.validate_vocab(vocab, ctx.engine.input_processor.max_logprobs)
    except ValueError as e:
        raise APIError(400, str(e).replace("SamplingParams.logprob_token_ids", "label_token_ids"),
                       "label_token_ids", "invalid_value") from e
    # The engine's request ids are the server's own; a client's request_id names the answer only (as in chat and
    # completions): two requests sending one request_id must not collide there, where the second's refusal
    # aborted the first's requests and left its client waiting for ever.
    request_id = f"generative-scoring-{uuid.uuid4().hex}"
    response_id = f"generative-scoring-{req.request_id}" if req.request_id else request_id
    streams, ids = add_requests(ctx.engine, request_id, prompts, params, OutputKind.FINAL, lora, req.priority,
                                log=ctx.request_logger)
    return await until_disconnect(raw_request, _scores(ctx, req, response_id, streams, ids))


def _check_ids(ids: list[int], vocab: int, param: str):
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"{param} must be token ids in [0, {vocab}), got {bad[:5]}", param, "invalid_value")


async def _scores(ctx: ServingContext, req: GenerativeScoringRequest, request_id: str, streams, ids) -> dict:
    try:
        outputs = await final_outputs(streams)
    finally:
        abort_all(ctx.engine, ids)
    labels = list(dict.fromkeys(req.label_token_ids))
    data = []
    for i, out in enumerate(outputs):
        position = out.outputs[0].logprobs[0]
        logprobs = [position[t].logprob for t in labels]
        if req.apply_softmax:   # over the labels alone
            top = max(logprobs)
            score = math.exp(logprobs[0] - top) / sum(math.exp(lp - top) for lp in logprobs)
        else:
            score = math.exp(logprobs[0])
        data.append({"index": i, "object": "score", "score": score})
    num_prompt = sum(len(o.prompt_token_ids) for o in outputs)
    num_completion = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"id": request_id, "object": "list", "created": int(time.time()), "model": ctx.served_name(req.model),
            "data": data, "usage": usage(num_prompt, num_completion)}
