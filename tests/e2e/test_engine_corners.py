"""Corners of the engine core that the differential fuzz (engine_fuzz.py) does not reach, each against the same
requests run plainly (tiny random models, float32 on CPU)."""
from pagedllm import LLM, SamplingParams


def _drain(engine) -> dict:
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    return finished


def test_a_request_id_used_again_right_after_its_request_ended(tiny_model_dirs):
    """An id is free once its request has finished or was aborted, but the runner hears of that end only with
    the next step: the new request's step failed with a KeyError (taking the other requests of the step with
    it), took the old one's in-flight token, or sampled with the old one's cached parameters."""
    llm = LLM(tiny_model_dirs["qwen3"], dtype="float32", log_stats_interval=0)
    engine = llm.engine
    prompt = list(range(10, 30))
    seeded = SamplingParams(temperature=0.8, seed=3, max_tokens=6, ignore_eos=True)
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in llm.generate([prompt, prompt[::-1]], [seeded, greedy], use_tqdm=False)]

    engine.add_request("x", prompt, greedy)
    while not any(o.finished for o in engine.step()):   # ended: its end is not told to the runner yet
        pass
    engine.add_request("x", prompt, seeded)
    engine.add_request("other", prompt[::-1], greedy)
    finished = _drain(engine)
    assert [finished[i].outputs[0].token_ids for i in ("x", "other")] == want

    engine.add_request("y", prompt, greedy)
    engine.step()
    engine.abort_request("y")
    engine.add_request("y", prompt, seeded)
    assert _drain(engine)["y"].outputs[0].token_ids == want[0]
    stats = engine.get_stats()
    assert stats.num_blocks_free == stats.num_blocks_total
