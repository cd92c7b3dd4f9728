"""AsyncLLM's Python API as a vLLM user calls it: prompts, abort, the end of a stream."""
import asyncio

import pytest

from pagedllm import RequestOutput, SamplingParams
from pagedllm.config import EngineConfig
from pagedllm.engine.async_llm import AsyncLLM, EngineDeadError

LONG = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)


def run(model_dir: str, body):
    """body(engine) on a fresh engine (the core in its own process), shut down after."""
    async def main():
        engine = AsyncLLM(EngineConfig(model_dir, num_gpu_blocks_override=64, max_model_len=256,
                                       log_stats_interval=0, device="cpu"))
        try:
            await body(engine)
        finally:
            engine.shutdown()
    asyncio.run(main())


async def _idle(engine: AsyncLLM):
    stats = await engine.get_stats()
    assert not engine.output_processor.parents and not engine._queues
    assert stats.num_running == stats.num_waiting == 0 and stats.num_blocks_free == stats.num_blocks_total


async def _last(stream) -> RequestOutput:
    """The stream's outputs up to its finished one (those of steps before an abort come first)."""
    async def read():
        async for out in stream:
            if out.finished:
                return out
    return await asyncio.wait_for(read(), 10)


@pytest.mark.parametrize("n", [1, 2])
def test_abort_from_elsewhere_ends_the_stream_with_finish_reason_abort(tiny_model_dirs, n):
    """As vLLM's: the stream of a request aborted by another caller ends with a finished output whose
    unfinished sequences say "abort"; its consumer does not wait forever."""
    async def body(engine):
        # add_request queues it and returns its stream: aborted before this event loop has read any output of
        # it, so it cannot have finished first
        stream = engine.add_request("a", [1, 5, 6, 7], SamplingParams(**{**vars(LONG), "n": n}))
        engine.abort("a")
        last = await _last(stream)
        assert [c.finish_reason for c in last.outputs] == ["abort"] * n
        assert [c.index for c in last.outputs] == list(range(n))
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()
        await _idle(engine)
    run(tiny_model_dirs["llama"], body)


def test_abort_takes_one_id_or_several(tiny_model_dirs):
    """vLLM's abort(request_id: str | Iterable[str]): a list (or any iterable) of ids aborts each."""
    async def body(engine):
        streams = [engine.add_request(rid, [1, 5, 6, 7], LONG) for rid in ("a", "b", "c")]
        engine.abort(["a", "b"])
        engine.abort(rid for rid in ("c",))
        for s in streams:
            last = await _last(s)
            assert last.outputs[0].finish_reason == "abort"
        await _idle(engine)
    run(tiny_model_dirs["llama"], body)


def test_generate_takes_vllm_dict_prompts(tiny_model_dirs):
    """vLLM's TextPrompt {"prompt": ...} and TokensPrompt {"prompt_token_ids": [...]} run as the text and the ids
    do; a dict with other keys is a ValueError naming them, not a complaint about token ids."""
    short = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)

    async def body(engine):
        ids = engine.tokenizer.encode("Once upon a time")
        by_text, by_dict_text, by_ids, by_dict_ids = [
            await _last(engine.generate(p, short, f"r{i}"))
            for i, p in enumerate(["Once upon a time", {"prompt": "Once upon a time"}, ids,
                                   {"prompt_token_ids": ids}])]
        assert by_dict_text.prompt == "Once upon a time" and by_dict_text.prompt_token_ids == ids
        assert by_dict_ids.prompt_token_ids == ids
        assert by_text.outputs[0].token_ids == by_dict_text.outputs[0].token_ids == by_ids.outputs[0].token_ids \
            == by_dict_ids.outputs[0].token_ids
        with pytest.raises(ValueError, match="multi_modal_data"):
            await engine.generate({"prompt": "a", "multi_modal_data": {"image": None}}, short, "bad").__anext__()
        await _idle(engine)
    run(tiny_model_dirs["llama"], body)


def test_closing_a_generate_stream_aborts_its_request_at_once(tiny_model_dirs):
    """aclose() on generate()'s stream (contextlib.aclosing, an early return) aborts the request before it returns,
    as vLLM's generate does on GeneratorExit: its id is free for the next request at once."""
    async def body(engine):
        stream = engine.generate([1, 5, 6, 7], LONG, "a")
        await stream.__anext__()
        await stream.aclose()
        assert not engine.output_processor.parents and not engine._queues
        again = await _last(engine.generate([1, 5, 6, 7], SamplingParams(max_tokens=2), "a"))
        assert again.outputs[0].finish_reason == "length"
        await _idle(engine)
    run(tiny_model_dirs["llama"], body)


def test_abort_may_be_awaited_as_vllms(tiny_model_dirs):
    """vLLM's abort is a coroutine (`await engine.abort(...)`); here it takes effect when called, as before, and
    what it returns may be awaited."""
    async def body(engine):
        streams = [engine.add_request(rid, [1, 5, 6, 7], LONG) for rid in ("a", "b", "c")]
        await engine.abort("a")
        await engine.abort(["b"])
        engine.abort("c")   # not awaited: aborted all the same
        for s in streams:
            assert (await _last(s)).outputs[0].finish_reason == "abort"
        await _idle(engine)
    run(tiny_model_dirs["llama"], body)


def test_shutdown_ends_the_streams_in_flight_and_refuses_new_requests(tiny_model_dirs):
    """After shutdown() a stream still read raises EngineDeadError (it waited forever), and a new request is an
    EngineDeadError too (it was an OSError of the closed pipe: "handle is closed")."""
    async def body(engine):
        stream = engine.add_request("a", [1, 5, 6, 7], LONG)
        engine.shutdown()
        with pytest.raises(EngineDeadError):
            await _last(stream)
        with pytest.raises(EngineDeadError):
            await engine.generate([1, 5, 6, 7], LONG, "b").__anext__()
        with pytest.raises(EngineDeadError):
            await engine.get_stats()
    run(tiny_model_dirs["llama"], body)


def test_a_request_id_that_is_a_running_sequences_id_is_refused(tiny_model_dirs):
    """n > 1 runs as sequences "<id>#<i>" in the core: a request named as one of them (or one whose sequences
    would be named as a running request) is "already in use", as the offline Engine says, not a second request
    of the same id in the core whose outputs reach neither stream (both waited forever)."""
    async def body(engine):
        two = SamplingParams(**{**vars(LONG), "n": 2})
        streams = [engine.add_request("a", [1, 5, 6, 7], two), engine.add_request("b#1", [1, 5, 6, 7], LONG)]
        with pytest.raises(ValueError, match="request_id 'a#0' is already in use"):
            engine.add_request("a#0", [1, 5, 6, 7], LONG)
        with pytest.raises(ValueError, match="request_id 'b' is already in use"):
            engine.add_request("b", [1, 5, 6, 7], two)
        engine.abort(["a", "b#1"])
        for s in streams:
            assert (await _last(s)).finished
        await _idle(engine)
    run(tiny_model_dirs["llama"], body)


BAD_ARGUMENTS = [   # (prompt, sampling_params, request_id), the argument at fault, the words of its TypeError
    ("a", None, "r", "sampling_params must be a SamplingParams, got NoneType"),
    ("a", {"max_tokens": 3}, "r", "sampling_params must be a SamplingParams, got dict"),
    (None, SamplingParams(), "r", "prompt must be a string, token ids or a dict, got NoneType"),
    (5, SamplingParams(), "r", "prompt must be a string, token ids or a dict, got int"),
    ("a", SamplingParams(), 5, "request_id must be a str, got int"),
    ("a", SamplingParams(), None, "request_id must be a str, got NoneType"),
]


def test_arguments_of_the_wrong_type_are_a_type_error_naming_them(tiny_model_dirs):
    """Not an AttributeError ('NoneType' object has no attribute 'num_sequences'), a TypeError of the prompt's
    iteration, or a request run under the id None: AsyncLLM and the offline Engine name the argument."""
    from pagedllm import LLM

    async def body(engine):
        for prompt, params, request_id, words in BAD_ARGUMENTS:
            with pytest.raises(TypeError, match=words):
                await engine.generate(prompt, params, request_id).__anext__()
        await _idle(engine)
    run(tiny_model_dirs["llama"], body)
    engine = LLM(tiny_model_dirs["llama"], dtype="float32", log_stats_interval=0).engine
    for prompt, params, request_id, words in BAD_ARGUMENTS:
        with pytest.raises(TypeError, match=words):
            engine.add_request(request_id, prompt, params)
    assert not engine.has_unfinished_requests()


def test_sampling_params_output_kind_picks_what_the_outputs_hold_as_vllms(tiny_model_dirs):
    """vLLM's way to stream deltas, SamplingParams(output_kind=RequestOutputKind.DELTA), was a TypeError;
    FINAL_ONLY gives the finished output alone. An explicit output_kind argument still wins."""
    from pagedllm.engine.output_processor import OutputKind
    from pagedllm.sampling_params import RequestOutputKind

    async def outputs(engine, rid, kind, explicit=None):
        params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, output_kind=kind)
        return [o async for o in engine.generate([1, 5, 6, 7], params, rid, explicit)]

    async def body(engine):
        cumulative = await outputs(engine, "c", RequestOutputKind.CUMULATIVE)
        delta = await outputs(engine, "d", RequestOutputKind.DELTA)
        final = await outputs(engine, "f", RequestOutputKind.FINAL_ONLY)
        assert len(cumulative) > 1 and len(final) == 1 and final[0].finished
        assert [t for o in delta for t in o.outputs[0].token_ids] == cumulative[-1].outputs[0].token_ids
        assert len(delta[0].outputs[0].token_ids) < len(cumulative[-1].outputs[0].token_ids)
        assert len(await outputs(engine, "e", RequestOutputKind.DELTA, OutputKind.FINAL)) == 1
    run(tiny_model_dirs["llama"], body)
