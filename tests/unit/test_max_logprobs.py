"""--max-logprobs (vLLM's): the most logprobs and prompt_logprobs a request may ask for, and through them the
widest beam search; -1 = the vocabulary size. It was fixed at 20."""
import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.beam_search import BeamSearchParams
from pagedllm.config import EngineConfig

VOCAB = 512   # the tiny models'


def _llm(model_dir: str, max_logprobs: int) -> LLM:
    return LLM(model_dir, device="cpu", max_model_len=64, log_stats_interval=0, max_logprobs=max_logprobs)


def _top(llm: LLM, **kw) -> int:
    out = llm.generate([[3, 4, 5]], SamplingParams(max_tokens=2, **kw), use_tqdm=False)[0]
    return len(out.outputs[0].logprobs[0]) if "logprobs" in kw else len(out.prompt_logprobs[1])


def test_a_lower_bound_refuses_more_naming_the_field_and_the_limit(tiny_model_dirs):
    llm = _llm(tiny_model_dirs["llama"], 5)
    assert _top(llm, logprobs=5) in (5, 6)   # the top 5, and the sampled token when it is not among them
    for field in ("logprobs", "prompt_logprobs"):
        with pytest.raises(ValueError, match=rf"SamplingParams\.{field} must be <= max_logprobs \(5\), got 6"):
            llm.generate([[3, 4, 5]], SamplingParams(max_tokens=2, **{field: 6}), use_tqdm=False)
    with pytest.raises(ValueError, match=r"beam_width must be at most 2 .* at most max_logprobs \(5\): "
                                         r"raise --max-logprobs for more\), got 3"):
        llm.beam_search([[3, 4]], BeamSearchParams(beam_width=3, max_tokens=2))


def test_a_higher_bound_serves_more_than_20(tiny_model_dirs):
    llm = _llm(tiny_model_dirs["llama"], 40)
    assert _top(llm, logprobs=40) in (40, 41) and _top(llm, prompt_logprobs=40) in (40, 41)
    assert len(llm.beam_search([[3, 4]], BeamSearchParams(beam_width=11, max_tokens=2))[0].sequences) == 11


def test_minus_one_is_the_vocabulary(tiny_model_dirs):
    llm = _llm(tiny_model_dirs["llama"], -1)
    assert _top(llm, logprobs=VOCAB) == VOCAB
    with pytest.raises(ValueError, match=rf"must be <= max_logprobs \({VOCAB}\), got {VOCAB + 1}"):
        llm.generate([[3, 4, 5]], SamplingParams(max_tokens=2, logprobs=VOCAB + 1), use_tqdm=False)


def test_a_request_minus_one_is_the_vocabulary_where_the_bound_allows_it(tiny_model_dirs):
    """vLLM's logprobs=-1 / prompt_logprobs=-1: every token's logprob, allowed only where max_logprobs reaches the
    vocabulary. It was refused as "an integer >= 0"."""
    llm = _llm(tiny_model_dirs["llama"], -1)
    assert _top(llm, logprobs=-1) == VOCAB and _top(llm, prompt_logprobs=-1) == VOCAB
    llm = _llm(tiny_model_dirs["llama"], 20)
    for field in ("logprobs", "prompt_logprobs"):
        with pytest.raises(ValueError, match=rf"SamplingParams\.{field} must be <= max_logprobs \(20\) "
                                             rf"\(-1 is the vocabulary: {VOCAB} tokens\), got -1"):
            llm.generate([[3, 4, 5]], SamplingParams(max_tokens=2, **{field: -1}), use_tqdm=False)


def test_the_bound_never_passes_the_vocabulary_and_is_checked():
    """More than the vocabulary would reach the sampler's top-k and fail mid-step."""
    assert EngineConfig(max_logprobs=10_000).logprobs_bound(VOCAB) == VOCAB
    assert EngineConfig().logprobs_bound(VOCAB) == 20   # vLLM's default
    with pytest.raises(ValueError, match=r"max_logprobs must be >= 0, or -1 \(the vocabulary size\), got -2"):
        EngineConfig(max_logprobs=-2)
