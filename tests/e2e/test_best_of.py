"""best_of (vLLM v0's): best_of samples run, the n of highest cumulative logprob come back, best first."""
import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.config import DEMO_MODEL


@pytest.fixture(scope="module")
def llm():
    return LLM(DEMO_MODEL, log_stats_interval=0)


def test_best_of_returns_the_top_n_of_the_same_samples(llm):
    prompt = "Once upon a time"
    every = llm.generate(prompt, SamplingParams(n=5, seed=7, max_tokens=12, logprobs=0), use_tqdm=False)[0]
    best = llm.generate(prompt, SamplingParams(n=2, best_of=5, seed=7, max_tokens=12), use_tqdm=False)[0]
    ranked = sorted(every.outputs, key=lambda c: -c.cumulative_logprob)[:2]
    assert [c.token_ids for c in best.outputs] == [c.token_ids for c in ranked]
    assert [c.index for c in best.outputs] == [0, 1]
    assert [c.cumulative_logprob for c in best.outputs] == pytest.approx([c.cumulative_logprob for c in ranked])
    assert all(c.logprobs is None and c.text for c in best.outputs)   # logprobs were not asked for


def test_best_of_with_logprobs_and_greedy(llm):
    out = llm.generate("Tom had", SamplingParams(n=1, best_of=3, temperature=0.0, max_tokens=6, logprobs=2),
                       use_tqdm=False)[0]
    greedy = llm.generate("Tom had", SamplingParams(temperature=0.0, max_tokens=6), use_tqdm=False)[0]
    assert len(out.outputs) == 1 and out.outputs[0].token_ids == greedy.outputs[0].token_ids
    assert len(out.outputs[0].logprobs) == 6
    stats = llm.engine.get_stats()
    assert stats.num_blocks_free == stats.num_blocks_total


def test_best_of_below_n_is_refused():
    with pytest.raises(ValueError, match="best_of"):
        SamplingParams(n=3, best_of=2)
