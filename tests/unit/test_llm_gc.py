"""LLM.generate freezes the collector's view of what existed before the run, and only while it runs."""
import gc

from pagedllm import LLM, SamplingParams


def test_generate_freezes_the_objects_alive_before_it(tiny_model_dirs):
    llm = LLM(tiny_model_dirs["llama"], device="cpu", log_stats_interval=0)
    seen, step = [], llm.engine.step

    def recorded():
        tracked = gc.get_objects()
        seen.append((gc.get_freeze_count(), any(o is llm.engine for o in tracked), any(o is seen for o in tracked)))
        return step()
    llm.engine.step = recorded
    gc.unfreeze()   # whatever an earlier test in this process froze
    llm.generate([[3, 4, 5]], SamplingParams(max_tokens=3), use_tqdm=False)
    assert seen and all(frozen > 0 and not engine and not mine for frozen, engine, mine in seen)
    assert gc.get_freeze_count() == 0   # after the run: everything collectable again (a deleted engine too)
    gc.freeze()   # a caller's own freeze is left alone
    try:
        count = gc.get_freeze_count()
        llm.generate([[3, 4, 5]], SamplingParams(max_tokens=3), use_tqdm=False)
        assert gc.get_freeze_count() > count // 2   # still frozen (less the objects freed meanwhile)
    finally:
        gc.unfreeze()
