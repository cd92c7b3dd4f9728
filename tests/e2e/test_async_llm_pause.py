"""AsyncLLM's vLLM 0.26 pause surface: pause_generation / resume_generation / is_paused and sleep(level=0) /
wake_up / is_sleeping. The core process holds the requests a pause holds: new ones queue and run once resumed;
"abort" ends those in the engine (their streams finish with "abort"), "wait" returns once the running ones end,
"keep" freezes them."""
import asyncio

import pytest

from e2e.test_async_llm_api import run   # body(engine) on a fresh AsyncLLM, shut down after
from pagedllm import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
PROMPT = list(range(3, 20))


async def _last(engine, request_id, params=GREEDY):
    outs = [o async for o in engine.generate(PROMPT, params, request_id)]
    return outs[-1]


def test_requests_sent_while_asleep_wait_then_give_the_same_tokens(tiny_model_dirs):
    async def body(engine):
        expected = (await _last(engine, "ref")).outputs[0].token_ids
        await engine.sleep(level=0, mode="abort")
        assert await engine.is_sleeping() and await engine.is_paused()
        task = asyncio.ensure_future(_last(engine, "queued"))
        await asyncio.sleep(0.5)
        assert not task.done()
        assert (await engine.get_stats()).num_waiting == 1
        await engine.wake_up(tags=["scheduling"])
        assert not await engine.is_sleeping()
        out = await asyncio.wait_for(task, 30)
        assert out.outputs[0].token_ids == expected and out.outputs[0].finish_reason == "length"
    run(tiny_model_dirs["llama"], body)


def test_pause_abort_ends_the_streams_in_flight_and_keep_freezes_them(tiny_model_dirs):
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def body(engine):
        task = asyncio.ensure_future(_last(engine, "a", long))
        while (await engine.get_stats()).num_running == 0:
            await asyncio.sleep(0.01)
        await engine.pause_generation(mode="abort")
        out = await asyncio.wait_for(task, 10)
        assert out.finished and out.outputs[0].finish_reason == "abort"
        await engine.resume_generation()
        assert not await engine.is_paused()

        # long enough not to end before the pause lands (6 tokens ended first under load)
        expected = (await _last(engine, "ref", long)).outputs[0].token_ids
        task = asyncio.ensure_future(_last(engine, "k", long))
        while (await engine.get_stats()).num_running == 0:
            await asyncio.sleep(0.01)
        await engine.pause_generation(mode="keep", clear_cache=False)
        await asyncio.sleep(0.5)
        stats = await engine.get_stats()
        assert not task.done() and stats.num_running == 1
        await engine.resume_generation()
        assert (await asyncio.wait_for(task, 30)).outputs[0].token_ids == expected
    run(tiny_model_dirs["llama"], body)


def test_pause_wait_returns_after_the_running_requests_end(tiny_model_dirs):
    async def body(engine):
        task = asyncio.ensure_future(_last(engine, "w"))
        while (await engine.get_stats()).num_running == 0:
            await asyncio.sleep(0.01)
        await engine.pause_generation(mode="wait")
        assert (await engine.get_stats()).num_running == 0
        assert (await asyncio.wait_for(task, 1)).outputs[0].finish_reason == "length"
        await engine.resume_generation()
    run(tiny_model_dirs["llama"], body)


def test_levels_1_and_2_modes_and_tags_are_refused(tiny_model_dirs):
    async def body(engine):
        with pytest.raises(NotImplementedError, match="level=1"):
            await engine.sleep(1)
        with pytest.raises(ValueError, match="not a pause mode"):
            await engine.pause_generation(mode="later")
        with pytest.raises(ValueError, match="wake_up tags"):
            await engine.wake_up(["everything"])
        assert not await engine.is_sleeping()
    run(tiny_model_dirs["llama"], body)
