"""stop_reason of a request ended by the tokenizer's EOS, as vLLM's check_stop gives it (v1/core/sched/utils.py):
the EOS is checked before the stop ids, so listing it in stop_token_ids names no stop_reason; with ignore_eos only
the stop ids end a request, so there it does."""
import pytest

from pagedllm import LLM, SamplingParams

EOS = 2   # the demo tokenizer's


@pytest.fixture(scope="module")
def llm():
    return LLM(device="cpu")


def _first(llm, **kwargs):
    # logit_bias makes the EOS the first token (greedy)
    params = SamplingParams(temperature=0, max_tokens=4, logit_bias={EOS: 100}, **kwargs)
    return llm.generate(["Once upon a time"], params, use_tqdm=False)[0].outputs[0]


def test_the_eos_in_stop_token_ids_names_no_stop_reason(llm):
    for stop_token_ids in (None, [EOS], [7, EOS]):
        out = _first(llm, stop_token_ids=stop_token_ids)
        assert (out.token_ids, out.finish_reason, out.stop_reason) == ([EOS], "stop", None), stop_token_ids


def test_with_ignore_eos_the_eos_as_a_stop_id_is_the_stop_reason(llm):
    out = _first(llm, stop_token_ids=[EOS], ignore_eos=True)
    assert (out.token_ids, out.finish_reason, out.stop_reason) == ([EOS], "stop", EOS)
    out = _first(llm, ignore_eos=True)
    assert (out.token_ids, out.finish_reason, out.stop_reason) == ([EOS] * 4, "length", None)
