"""SamplingParams.flat_logprobs (vLLM 0.26's): logprobs and prompt_logprobs come as FlatLogprobs, which read as the
list of positions they replace. It was an unexpected-keyword TypeError."""
import time

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.core.messages import EngineCoreOutput, TokenLogprobs
from pagedllm.engine.output_processor import OutputKind, OutputProcessor
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


def _outputs(kind: OutputKind, flat: bool, num_steps: int = 6, n: int = 2):
    """Every RequestOutput of a request with prompt and sample logprobs, one token a step (the last two steps two,
    as a speculative step), n sequences, no tokenizer."""
    op = OutputProcessor(None)
    params = SamplingParams(n=n, max_tokens=99, logprobs=1, prompt_logprobs=1, detokenize=False, flat_logprobs=flat)
    op.add_request("r", None, [1, 2, 3], params, kind, time.time())
    prompt = [TokenLogprobs([t, 7], [-0.5 * t, -2.0], 1) for t in (2, 3)]
    results = []
    for step in range(num_steps):
        k = 2 if step >= num_steps - 2 else 1
        outs = [EngineCoreOutput(f"r#{s}", [10 + step + s] * k,
                                 logprobs=[TokenLogprobs([10 + step + s, 5], [-0.1 * step, -1.5 - s], 1)] * k,
                                 prompt_logprobs=prompt if step == s == 0 else None,
                                 finish_reason="length" if step == num_steps - 1 else None) for s in range(n)]
        results += op.process(outs)[0]
    return results


@pytest.mark.parametrize("kind", list(OutputKind))
def test_flat_outputs_are_the_plain_outputs_flattened(kind):
    plain, flat = _outputs(kind, False), _outputs(kind, True)
    assert len(plain) == len(flat) > 0
    for p, f in zip(plain, flat):
        assert f.prompt_logprobs == FlatLogprobs.from_positions(p.prompt_logprobs)
        assert [c.token_ids for c in f.outputs] == [c.token_ids for c in p.outputs]
        for pc, fc in zip(p.outputs, f.outputs):
            assert isinstance(fc.logprobs, FlatLogprobs) and fc.logprobs == FlatLogprobs.from_positions(pc.logprobs)


def test_cumulative_flat_outputs_flatten_each_position_once(monkeypatch):
    """A CUMULATIVE output carries every position so far: flattening them all again in each output was quadratic
    in the output's length. Each sample position (and each prompt position) must be flattened once."""
    calls = []
    append = FlatLogprobs.append
    monkeypatch.setattr(FlatLogprobs, "append", lambda self, position: calls.append(1) or append(self, position))
    num_steps, n = 40, 2
    outs = _outputs(OutputKind.CUMULATIVE, True, num_steps, n)
    num_positions = [len(c.logprobs) for c in outs[-1].outputs]
    assert num_positions == [num_steps + 2] * n
    assert len(outs[-1].prompt_logprobs) == 3
    assert len(calls) == sum(num_positions) + 3
