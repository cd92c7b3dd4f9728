"""SamplingParams.skip_reading_prefix_cache (vLLM 0.26's): the request computes its whole prompt, reading no
cached prefix; unset, it follows prompt_logprobs. It was an unexpected-keyword TypeError."""
import pytest

from pagedllm import LLM, SamplingParams

PROMPT = list(range(3, 3 + 70))   # several full blocks


@pytest.fixture(scope="module")
def llm():
    return LLM(device="cpu")


def test_skip_reading_prefix_cache_computes_the_whole_prompt(llm):
    greedy = dict(temperature=0, max_tokens=3)
    [first] = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(**greedy), use_tqdm=False)
    [cached] = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(**greedy), use_tqdm=False)
    [skipped] = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(**greedy, skip_reading_prefix_cache=True),
                             use_tqdm=False)
    assert cached.num_cached_tokens > 0 and skipped.num_cached_tokens == 0
    assert first.outputs[0].token_ids == cached.outputs[0].token_ids == skipped.outputs[0].token_ids
    assert SamplingParams().skip_reading_prefix_cache is False
    assert SamplingParams(prompt_logprobs=1).skip_reading_prefix_cache is True
    with pytest.raises(ValueError, match="SamplingParams.skip_reading_prefix_cache must be None, True or False"):
        SamplingParams(skip_reading_prefix_cache=0.0)
