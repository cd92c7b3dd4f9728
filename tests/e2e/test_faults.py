"""A request whose data raises inside the engine core fails alone; a step that raises fails its own requests,
and the core carries on with consistent state (blocks freed and uncached, runner rows released)."""
import asyncio
import copy
import dataclasses

import pytest

from conftest import final_token_ids, raising_at_call
from pagedllm import LLM, SamplingParams

PROMPTS = [[1] + list(range(10 + 7 * i, 10 + 7 * i + 37)) for i in range(4)]   # 38 tokens: 2 full blocks
POISON_PROMPT = [1] + list(range(300, 340))   # in no other request: no block of it is cached before


def _params(i: int) -> SamplingParams:
    """Greedy and seeded sampling: both give the same tokens whatever the batch."""
    return SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True) if i % 2 else \
        SamplingParams(temperature=1.0, seed=100 + i, max_tokens=12, ignore_eos=True)


def inject_bad_prompt(input_processor, request_id: str):
    """Request `request_id` loses its prompt token ids after validation (as a gap in the checks at the edge would
    let through): making its Request raises `TypeError: 'NoneType' object is not iterable` inside the engine
    core."""
    process = input_processor.process

    def process_then_break(rid, *args, **kwargs):
        req = process(rid, *args, **kwargs)
        for r in req.core_requests if rid == request_id else []:
            object.__setattr__(r, "prompt_token_ids", None)
        return req
    input_processor.process = process_then_break


@pytest.fixture(scope="module")
def llm(tiny_model_dirs):
    return LLM(tiny_model_dirs["llama"], num_gpu_blocks_override=64, max_model_len=256, max_num_seqs=2,
               log_stats_interval=0, device="cpu")


@pytest.fixture(scope="module")
def reference(llm):
    return [out.outputs[0].token_ids for out in llm.generate(PROMPTS, [_params(i) for i in range(4)],
                                                              use_tqdm=False)]


def _assert_idle(llm):
    engine = llm.engine
    assert engine.kv_cache_manager.num_used_blocks == 0
    # The runner drops finished requests' rows with the next step: no other state is left.
    pending_drop = engine.scheduler.finished_req_ids
    assert set(engine.runner.states) <= pending_drop
    assert not engine.has_unfinished_requests() and not engine.output_processor.parents


def test_bad_request_data_fails_alone_offline(llm, reference, monkeypatch):
    params = [_params(i) for i in range(4)]
    bad = SamplingParams(temperature=1.0, seed=7, max_tokens=12, n=2)
    first_id = int(next(llm._ids)) + 1   # LLM numbers its requests
    monkeypatch.setattr(llm.engine, "input_processor", copy.copy(llm.engine.input_processor))
    inject_bad_prompt(llm.engine.input_processor, str(first_id + 2))
    outs = llm.generate(PROMPTS[:2] + [PROMPTS[3]] + PROMPTS[2:], params[:2] + [bad] + params[2:], use_tqdm=False)
    assert [c.finish_reason for c in outs[2].outputs] == ["error", "error"]
    assert all(c.token_ids == [] for c in outs[2].outputs)
    assert [o.outputs[0].token_ids for o in outs[:2] + outs[3:]] == reference
    assert all(o.outputs[0].finish_reason == "length" for o in outs[:2] + outs[3:])
    _assert_idle(llm)


def test_interrupted_add_leaves_no_request_of_the_batch(llm, reference, monkeypatch):
    """Ctrl-C while LLM.generate adds its prompts (tokenizing a large batch takes a while) lands in the adding
    loop, which took back the requests added so far for an Exception only: they stayed in the engine, holding
    their KV blocks, and the next generate() ran them to the end too (for nobody). None is left now."""
    monkeypatch.setattr(llm.engine, "add_request", raising_at_call(llm.engine.add_request, 3, KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPTS, [_params(i) for i in range(4)], use_tqdm=False)
    monkeypatch.undo()
    assert not llm.engine.has_unfinished_requests()
    _assert_idle(llm)
    outs = llm.generate(PROMPTS, [_params(i) for i in range(4)], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == reference


def test_failed_step_fails_its_requests_and_the_core_carries_on(llm, reference, monkeypatch):
    """The step that first schedules "poison" raises before its forward: the requests of that step fail,
    the step before it is still applied, the others run on unchanged. The poisoned step's blocks were
    hashed at allocation but never written: they must not be found by the same prompt afterwards."""
    engine, runner = llm.engine, llm.engine.runner
    build = type(runner)._sampling_metadata

    def failing(self, rows, *args):
        if any(r.req_id == "poison" for r in rows):
            raise RuntimeError("injected step failure")
        return build(self, rows, *args)

    monkeypatch.setattr(type(runner), "_sampling_metadata", failing)
    fail_step, in_flight_at_failure = engine.core._fail_step, []

    def record_in_flight(sched_out, e):
        in_flight_at_failure.append(engine.core._in_flight is not None)
        return fail_step(sched_out, e)
    monkeypatch.setattr(engine.core, "_fail_step", record_in_flight)
    # max_num_seqs 2: "short" and "long" run first; "poison" joins when "short" ends, in a step with "long".
    engine.add_request("short", PROMPTS[0], dataclasses.replace(_params(0), max_tokens=2))
    engine.add_request("long", PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    engine.add_request("poison", POISON_PROMPT, _params(2))
    engine.add_request("after", PROMPTS[3], _params(3))
    finished = {}
    while engine.has_unfinished_requests():
        finished.update((o.request_id, o) for o in engine.step() if o.finished)
    assert in_flight_at_failure == [True]   # the step before the failed one was still to be read
    assert finished["short"].outputs[0].token_ids == reference[0][:2]
    assert finished["poison"].outputs[0].finish_reason == "error"
    assert finished["long"].outputs[0].finish_reason == "error"   # in the failed step with poison
    assert finished["after"].outputs[0].token_ids == reference[3]
    _assert_idle(llm)
    monkeypatch.undo()
    outs = llm.generate(PROMPTS + [POISON_PROMPT], [_params(i) for i in range(4)] + [_params(2)], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs[:4]] == reference
    assert llm.reset_prefix_cache()
    assert llm.generate(POISON_PROMPT, _params(2), use_tqdm=False)[0].outputs[0].token_ids == \
        outs[4].outputs[0].token_ids
    _assert_idle(llm)


def test_bad_request_data_fails_alone_async(tiny_model_dirs, reference):
    """AsyncLLM (the core in its own process): the bad request's stream raises EngineGenerateError, the
    others finish with the tokens they have without it, and the engine serves on."""
    from pagedllm.config import EngineConfig
    from pagedllm.engine.async_llm import AsyncLLM, EngineGenerateError

    async def main():
        engine = AsyncLLM(EngineConfig(tiny_model_dirs["llama"], num_gpu_blocks_override=64, max_model_len=256,
                                       log_stats_interval=0, device="cpu"), heartbeat_timeout=2.0)
        inject_bad_prompt(engine.input_processor, "bad")
        await asyncio.sleep(2.5)   # no loop read the pipe yet: its heartbeats still count (unhealthy_reason)
        try:
            tasks = [final_token_ids(engine, f"r{i}", p, _params(i)) for i, p in enumerate(PROMPTS)]
            tasks.insert(2, final_token_ids(engine, "bad", PROMPTS[1], SamplingParams(temperature=1.0, seed=3, n=2)))
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert isinstance(results[2], EngineGenerateError) and "not iterable" in str(results[2])
            assert results[:2] + results[3:] == reference
            assert not engine._unscheduled and not engine.output_processor.parents
            assert await final_token_ids(engine, "again", PROMPTS[0], _params(0)) == reference[0]
            stats = await engine.get_stats()
            assert stats.num_running == stats.num_waiting == 0 and stats.num_blocks_free == stats.num_blocks_total
        finally:
            engine.shutdown()

    asyncio.run(main())


def test_request_that_cannot_be_sent_fails_alone(tiny_model_dirs, reference):
    """A request the pipe to the core cannot carry (it does not pickle: a body nested past the recursion limit
    that got by the server's checks) fails at its add, alone; the requests after it are served. Pickled in the
    pipe's writer thread, it ended the thread, and every later request waited for ever."""
    from pagedllm.config import EngineConfig
    from pagedllm.engine.async_llm import AsyncLLM

    async def main():
        engine = AsyncLLM(EngineConfig(tiny_model_dirs["llama"], num_gpu_blocks_override=64, max_model_len=256,
                                       log_stats_interval=0, device="cpu"))
        process = engine.input_processor.process

        def unpicklable(rid, *args, **kwargs):
            req = process(rid, *args, **kwargs)
            for r in req.core_requests if rid == "bad" else []:
                object.__setattr__(r, "prompt_token_ids", lambda: None)   # a local function: no pickle
            return req
        engine.input_processor.process = unpicklable
        try:
            with pytest.raises(Exception, match="pickle"):
                await asyncio.wait_for(final_token_ids(engine, "bad", PROMPTS[1], _params(1)), 60)
            assert "bad" not in engine._queues and not engine._unscheduled and not engine.output_processor.parents
            assert await asyncio.wait_for(final_token_ids(engine, "after", PROMPTS[0], _params(0)), 60) == \
                reference[0]
        finally:
            engine.shutdown()

    asyncio.run(main())


def test_request_whose_output_state_cannot_be_built_is_not_left_in_the_core(tiny_model_dirs, reference):
    """A request whose detokenizer fails to start (it decodes the prompt's last tokens: a tokenizer that raises,
    or panics, on one of them) fails at its add. It had been sent to the core first, which ran it to its end for
    nobody, its KV blocks held meanwhile (the test's core still had it running). The core never sees it now."""
    from pagedllm.config import EngineConfig
    from pagedllm.engine.async_llm import AsyncLLM

    async def main():
        engine = AsyncLLM(EngineConfig(tiny_model_dirs["llama"], num_gpu_blocks_override=64, max_model_len=256,
                                       log_stats_interval=0, device="cpu"))
        add = engine.output_processor.add_request

        def undecodable_prompt(request_id, *args, **kwargs):
            if request_id == "bad":
                raise RuntimeError("decoding the prompt's last tokens failed")
            return add(request_id, *args, **kwargs)
        engine.output_processor.add_request = undecodable_prompt
        try:
            params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
            with pytest.raises(RuntimeError, match="prompt's last tokens"):
                await asyncio.wait_for(final_token_ids(engine, "bad", PROMPTS[1], params), 60)
            assert "bad" not in engine._queues and not engine._unscheduled and not engine.output_processor.parents
            stats = await engine.get_stats()
            assert stats.num_running == stats.num_waiting == 0 and stats.num_blocks_free == stats.num_blocks_total
            assert await asyncio.wait_for(final_token_ids(engine, "after", PROMPTS[0], _params(0)), 60) == \
                reference[0]
        finally:
            engine.shutdown()

    asyncio.run(main())


class PanicException(BaseException):
    """As pyo3's: a Rust tokenizer's panic (tiktoken decoding an id it has no entry for, openai/tiktoken#47; an
    HF tokenizers component, huggingface/tokenizers#2151) reaches Python as a BaseException, not an Exception."""


@pytest.mark.parametrize("error", [RuntimeError, PanicException])
def test_output_processing_that_raises_fails_the_requests_in_flight(tiny_model_dirs, reference, error):
    """A step's outputs that the API process fails to process (a bug there, or the tokenizer's panic while
    decoding) end every request in flight with an error (their outputs are lost: their state is unknown), and
    abort them in the core; new requests are served. It was logged by the event loop only, and every open stream
    waited for ever; a panic, not an Exception, still was."""
    from pagedllm.config import EngineConfig
    from pagedllm.engine.async_llm import AsyncLLM, EngineGenerateError

    async def main():
        engine = AsyncLLM(EngineConfig(tiny_model_dirs["llama"], num_gpu_blocks_override=64, max_model_len=256,
                                       log_stats_interval=0, device="cpu"))
        engine.output_processor.process = raising_at_call(engine.output_processor.process, 3,
                                                          error("a bug in output processing"))
        try:
            tasks = [final_token_ids(engine, f"r{i}", p, _params(i)) for i, p in enumerate(PROMPTS[:2])]
            results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
            assert all(isinstance(r, EngineGenerateError) and r.status == 500 and "a bug in output processing"
                       in str(r) for r in results), results
            assert not engine._queues and not engine._unscheduled and not engine.output_processor.parents
            assert await asyncio.wait_for(final_token_ids(engine, "after", PROMPTS[0], _params(0)), 60) == \
                reference[0]
            stats = await engine.get_stats()
            assert stats.num_running == stats.num_waiting == 0 and stats.num_blocks_free == stats.num_blocks_total
        finally:
            engine.shutdown()

    asyncio.run(main())
