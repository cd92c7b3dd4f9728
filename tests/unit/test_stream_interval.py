"""OutputProcessor's stream_interval (vLLM's --stream-interval): an output per step by default, whatever the step
carries; with N, a sequence's first token at once, then every N tokens, and its finish; nothing lost or doubled."""
import time

import pytest

from pagedllm.core.messages import EngineCoreOutput
from pagedllm.engine.output_processor import OutputKind, OutputProcessor
from pagedllm.sampling_params import SamplingParams


def _run(interval: int, steps: list[list[int]], kind=OutputKind.DELTA, n: int = 1):
    """steps: tokens per step for every sequence; the last step finishes them ("length")."""
    op = OutputProcessor(None, interval)
    op.add_request("r", None, [1, 2], SamplingParams(n=n, max_tokens=99, detokenize=False), kind, time.time())
    next_id, outputs = 10, []
    for i, k in enumerate(steps):
        last = i == len(steps) - 1
        step = []
        for s in range(n):
            step.append(EngineCoreOutput("r" if n == 1 else f"r#{s}", list(range(next_id, next_id + k)),
                                         finish_reason="length" if last else None))
        next_id += k
        outs, _, _ = op.process(step)
        outputs.append(outs[0] if outs else None)
    return outputs


def test_default_is_one_output_per_step_whatever_it_carries():
    outs = _run(1, [1, 4, 1, 3])   # a speculative step carries several tokens: still one output
    assert [len(o.outputs[0].token_ids) for o in outs] == [1, 4, 1, 3]
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "length"


def test_interval_buffers_until_n_tokens_or_the_finish():
    outs = _run(4, [1] * 11)
    sent = [None if o is None else o.outputs[0].token_ids for o in outs]
    assert [None if s is None else len(s) for s in sent] == [1, None, None, None, 4, None, None, None, 4, None, 2]
    assert [t for s in sent if s for t in s] == list(range(10, 21))   # every token once, in order


def test_interval_counts_tokens_not_steps():
    outs = _run(4, [1, 3, 2, 5, 1])
    assert [None if o is None else len(o.outputs[0].token_ids) for o in outs] == [1, None, 5, 5, 1]


@pytest.mark.parametrize("kind", [OutputKind.DELTA, OutputKind.CUMULATIVE])
def test_interval_with_n_sequences(kind):
    outs = _run(3, [1, 1, 1, 1, 1], kind=kind, n=2)
    assert [o is not None for o in outs] == [True, False, False, True, True]
    final = outs[-1]
    assert final.finished and [c.finish_reason for c in final.outputs] == ["length", "length"]
    if kind == OutputKind.CUMULATIVE:
        assert [len(c.token_ids) for c in final.outputs] == [5, 5]
    else:
        assert sum(len(o.outputs[0].token_ids) for o in outs if o is not None) == 5


def test_a_finished_sibling_does_not_make_the_others_due():
    op = OutputProcessor(None, 4)
    op.add_request("r", None, [1, 2], SamplingParams(n=2, max_tokens=99, detokenize=False), OutputKind.DELTA,
                   time.time())
    first, _, _ = op.process([EngineCoreOutput("r#0", [5], finish_reason="length"), EngineCoreOutput("r#1", [6])])
    assert [(c.index, c.finish_reason) for c in first[0].outputs] == [(0, "length"), (1, None)]
    later, _, _ = op.process([EngineCoreOutput("r#1", [7])])
    assert later == []   # sequence 1 has 1 new token of 4; sequence 0 has nothing new
