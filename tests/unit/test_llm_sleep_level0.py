"""vLLM 0.26's sleep(level=0) / wake_up(tags=["scheduling"]) on the offline LLM (its throughput benchmark's
--prequeue-requests): scheduling pauses, enqueued requests wait, and the modes treat those already in the engine
as vLLM's engine core does (abort: they end with finish_reason "abort"; wait: the running ones end first; keep:
they stay and go on). Levels 1 and 2 are refused naming the level."""
import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.core.scheduler import PauseState

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
PROMPTS = ["Once upon", "The cat", "A dog ran"]


@pytest.fixture(scope="module")
def llm():
    return LLM(device="cpu")


def _texts(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_prequeued_requests_wait_while_asleep_and_give_the_same_greedy_tokens(llm):
    expected = _texts(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    llm.sleep(level=0, mode="abort")
    assert llm.llm_engine.is_sleeping()
    llm.enqueue(PROMPTS, GREEDY, use_tqdm=False)
    for _ in range(3):   # steps while asleep schedule nothing
        assert llm.llm_engine.step() == []
    assert len(llm.llm_engine.scheduler.waiting) == 3 and not llm.llm_engine.scheduler.running
    with pytest.raises(RuntimeError, match=r"asleep .*wake_up\(\)"):
        llm.wait_for_completion(use_tqdm=False)   # vLLM's would step forever
    llm.wake_up(tags=["scheduling"])
    assert not llm.llm_engine.is_sleeping()
    assert _texts(llm.wait_for_completion(use_tqdm=False)) == expected


def test_abort_mode_ends_the_enqueued_requests(llm):
    llm.enqueue(PROMPTS[:2], GREEDY, use_tqdm=False)
    llm.llm_engine.step()   # one of them runs
    llm.sleep(0, "abort")
    assert not llm.llm_engine.scheduler.running and not llm.llm_engine.scheduler.waiting
    llm.wake_up()
    outs = llm.wait_for_completion(use_tqdm=False)
    assert [o.outputs[0].finish_reason for o in outs] == ["abort", "abort"] and all(o.finished for o in outs)
    assert llm.llm_engine.kv_cache_manager.num_used_blocks == 0


def test_wait_mode_runs_the_running_requests_to_their_end_and_holds_the_waiting(llm):
    expected = _texts(llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False))
    llm.enqueue(PROMPTS[:1], GREEDY, use_tqdm=False)
    llm.llm_engine.step()   # running now
    llm.enqueue(PROMPTS[1:2], GREEDY, use_tqdm=False)   # waiting
    llm.sleep(level=0, mode="wait")
    scheduler = llm.llm_engine.scheduler
    assert not scheduler.running and [r.request_id for r in scheduler.waiting] == [list(llm._queued)[1]]
    assert scheduler.pause_state == PauseState.PAUSED_NEW
    llm.wake_up(["scheduling"])
    outs = llm.wait_for_completion(use_tqdm=False)
    assert _texts(outs) == expected and {o.outputs[0].finish_reason for o in outs} == {"length"}


def test_keep_mode_freezes_the_running_requests_and_they_go_on(llm):
    expected = _texts(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    llm.enqueue(PROMPTS, GREEDY, use_tqdm=False)
    llm.llm_engine.step()
    llm.llm_engine.step()
    llm.sleep(0, "keep")
    running = [(r.request_id, r.num_computed_tokens) for r in llm.llm_engine.scheduler.running]
    assert running and llm.llm_engine.scheduler.pause_state == PauseState.PAUSED_ALL
    for _ in range(3):
        llm.llm_engine.step()
    assert [(r.request_id, r.num_computed_tokens) for r in llm.llm_engine.scheduler.running] == running
    llm.wake_up()
    assert _texts(llm.wait_for_completion(use_tqdm=False)) == expected


def test_generate_while_asleep_is_refused_and_leaves_nothing_queued(llm):
    llm.sleep(0)
    try:
        with pytest.raises(RuntimeError, match="asleep"):
            llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)
        assert not llm.llm_engine.has_unfinished_requests()
    finally:
        llm.wake_up()


@pytest.mark.parametrize("level, words", [(1, "level=1.*offloading the weights"), (2, "level=2.*discarding")])
def test_sleep_levels_1_and_2_are_refused_naming_the_level(llm, level, words):
    with pytest.raises(NotImplementedError, match=words):
        llm.sleep(level=level)
    assert not llm.llm_engine.is_sleeping()


def test_bad_mode_level_and_tags_are_refused(llm):
    with pytest.raises(ValueError, match="mode 'drain' is not a pause mode"):
        llm.sleep(0, "drain")
    with pytest.raises(ValueError, match="sleep level must be 0, 1 or 2"):
        llm.sleep(3)
    with pytest.raises(ValueError, match=r"wake_up tags \['all'\]"):
        llm.wake_up(["all"])
    assert not llm.llm_engine.is_sleeping()


def test_engine_sleep_state_reports_sleep_level_0_as_vllm_and_pause_generation_as_awake(llm):
    """vLLM's /metrics engine_sleep_state: awake 0 (weights_offloaded and discard_all 0) after sleep(level=0)
    until wake_up; pause_generation is no sleep (awake stays 1). It said "always awake", 1, while asleep."""
    from pagedllm.server.metrics import ServerMetrics

    def state():
        text = ServerMetrics("m").render(llm.llm_engine.get_stats()).decode()
        return {s: float(text.split(f'engine_sleep_state{{engine="0",model_name="m",sleep_state="{s}"}} ')[1]
                         .split()[0]) for s in ("awake", "weights_offloaded", "discard_all")}

    awake = {"awake": 1.0, "weights_offloaded": 0.0, "discard_all": 0.0}
    assert state() == awake
    llm.sleep(level=0, mode="keep")
    assert state() == {"awake": 0.0, "weights_offloaded": 0.0, "discard_all": 0.0}
    llm.wake_up()
    assert state() == awake
    llm.llm_engine.core.pause("abort", False)   # AsyncLLM.pause_generation's core call
    assert llm.llm_engine.is_sleeping() and state() == awake
    llm.llm_engine.sleep(level=0)   # asleep while paused, until resumed
    assert state()["awake"] == 0.0
    llm.llm_engine.core.resume()   # resume_generation wakes it too (vLLM's gauge stays at 0 then)
    assert state() == awake and not llm.llm_engine.is_sleeping()
