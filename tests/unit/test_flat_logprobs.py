"""SamplingParams.flat_logprobs (vLLM 0.26's): logprobs and prompt_logprobs come as FlatLogprobs, which read as the
list of positions they replace. It was an unexpected-keyword TypeError."""
import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.outputs import FlatLogprobs


@pytest.fixture(scope="module")
def llm():
    return LLM(device="cpu")


def test_flat_logprobs_read_as_the_lists_they_replace(llm):
    kw = dict(temperature=0, max_tokens=4, logprobs=2, prompt_logprobs=1)
    [plain] = llm.generate("Once upon a", SamplingParams(**kw), use_tqdm=False)
    [flat] = llm.generate("Once upon a", SamplingParams(**kw, flat_logprobs=True), use_tqdm=False)
    got, want = flat.outputs[0].logprobs, plain.outputs[0].logprobs
    assert isinstance(got, FlatLogprobs) and not isinstance(want, FlatLogprobs)
    assert len(got) == len(want) == 4 and list(got) == want and got[-1] == want[-1]
    assert list(got[1:3]) == want[1:3] and isinstance(got[1:3], FlatLogprobs)
    assert len(got.token_ids) == len(got.logprobs) == sum(len(p) for p in want)
    prompt = flat.prompt_logprobs
    assert isinstance(prompt, FlatLogprobs) and prompt[0] == {} and plain.prompt_logprobs[0] is None   # as vLLM's
    assert list(prompt[1:]) == plain.prompt_logprobs[1:]
    with pytest.raises(TypeError):
        got[0] = {}
    with pytest.raises(ValueError, match="SamplingParams.flat_logprobs must be True or False"):
        SamplingParams(flat_logprobs="yes")
