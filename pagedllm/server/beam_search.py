"""Beam search behind the server (use_beam_search): one prompt's search on AsyncLLM, as a stream of one
RequestOutput, so completions and chat treat it as any request (streamed: all at once at the end)."""
import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator

from pagedllm.beam_search import (BeamSearchInstance, BeamSearchParams, beam_cache_salt, finish_text,
                                  step_sampling_params)
from pagedllm.engine.output_processor import OutputKind
from pagedllm.outputs import CompletionOutput, RequestMetrics, RequestOutput
from pagedllm.server.errors import APIError


def check_beam_search(engine, params: BeamSearchParams, priority: int = 0):
    """At request time, naming the server's field: the beam width is n. Its step requests are added later,
    inside the stream: a priority the engine would refuse is refused here (a ValueError naming it: a 400)."""
    engine.input_processor.check_priority(priority)
    try:
        step_sampling_params(params, len(engine.input_processor.eos_token_ids), engine.input_processor.max_logprobs)
    except ValueError as e:
        raise APIError(400, str(e).replace("BeamSearchParams.beam_width", "n (the beam width)"), "n",
                       "invalid_value") from None


async def beam_search_stream(engine, request_id: str, prompt_ids: list[int], params: BeamSearchParams,
                             lora_request=None, priority: int = 0) -> AsyncIterator[RequestOutput]:
    """Each step adds every running beam as a 1-token request at once (the core batches them with everything
    else in flight), each forking the held request of the beam it extends (core/kv_fork.py). Leaving early
    aborts the step's requests (AsyncLLM's streams do it when closed) and releases the held ones."""
    arrival = time.time()
    params = dataclasses.replace(params, max_tokens=min(params.max_tokens, engine.max_model_len - len(prompt_ids)))
    eos = engine.input_processor.eos_token_ids
    step_params = step_sampling_params(params, len(eos), engine.input_processor.max_logprobs)
    salt = beam_cache_salt(request_id, engine.input_processor.enable_prefix_caching)
    inst = BeamSearchInstance(prompt_ids, params, eos)
    held: list[str] = []   # the step before's requests, whose KV this step's requests fork
    added: list[str] = []  # this step's requests, as added so far
    try:
        while not inst.done:
            ids = [f"{request_id}-{inst.num_generated}-{j}" for j in range(len(inst.running))]
            streams, added = [], []
            for rid, beam, parent in zip(ids, inst.beam_prompts(), inst.beam_parents()):
                streams.append(engine.add_request(rid, beam, step_params, output_kind=OutputKind.FINAL,
                                                  cache_salt=salt, kv_parent=parent, hold_kv=True,
                                                  lora_request=lora_request, priority=priority))
                added.append(rid)
            engine.release_kv_holds(held)   # after their children: the core reads its messages in order
            held = ids
            outs = await asyncio.gather(*(_last(s) for s in streams))
            inst.step([o.outputs[0].logprobs[0] for o in outs], ids)
    finally:
        # A stream whose task was cancelled before it first ran (the client left as the step began) never
        # started, so it aborts nothing itself: its request would run on, end held, and the release below,
        # reaching the core before it ended, would leave its blocks held for good. Aborted first (a no-op once
        # finished), then released (ends the holds of those that finished), in this order in the core.
        for rid in added:
            engine.abort(rid)
        engine.release_kv_holds(list(dict.fromkeys(held + added)))
    yield _request_output(engine, request_id, inst, params, arrival)


async def _last(stream) -> RequestOutput:
    out = None
    async for out in stream:
        pass
    if out.outputs[0].finish_reason == "error" or not out.outputs[0].logprobs:
        raise RuntimeError(f"beam search step failed: {out.outputs[0].finish_reason}")
    return out


def _request_output(engine, request_id: str, inst: BeamSearchInstance, params: BeamSearchParams,
                    arrival: float) -> RequestOutput:
    n = len(inst.prompt_token_ids)
    decode = engine.tokenizer.decode
    special_ids = frozenset(getattr(engine.tokenizer, "all_special_ids", ()))
    completions = []
    for i, s in enumerate(inst.results()):
        # vLLM's: the EOS that ended a beam is one of its token_ids (so counted in usage, shown in logprobs) only
        # with include_stop_str_in_output, as a stop string is part of the text; cum_logprob keeps its logprob
        end = len(s.tokens) - (s.finish_reason == "stop" and not params.include_stop_str_in_output)
        text = finish_text(s, n, params, decode, with_prompt=False, special_ids=special_ids)
        completions.append(CompletionOutput(i, text, s.tokens[n:end], s.cum_logprob, s.logprobs[:end - n],
                                            s.finish_reason, s.stop_reason))
    metrics = RequestMetrics(arrival, finished_time=time.time())
    return RequestOutput(request_id, None, inst.prompt_token_ids, None, completions, True, metrics)
