"""AsyncLLM hands a consumer that fell behind one output for several steps: nothing may be lost or doubled."""
from pagedllm.engine.async_llm import _merge
from pagedllm.engine.output_processor import OutputKind
from pagedllm.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput


def _out(completions, finished=False):
    return RequestOutput("r", None, [1, 2], None, completions, finished, RequestMetrics(0.0))


def _c(index, text, ids, finish=None):
    return CompletionOutput(index, text, ids, -1.0, [{t: Logprob(-0.5)} for t in ids], finish)


def test_delta_outputs_concatenate_per_sequence():
    steps = [_out([_c(0, "Once", [5]), _c(1, "The", [7])]),
             _out([_c(1, " dog", [8])]),
             _out([_c(0, " upon", [6], "length"), _c(1, "", [2], "stop")], finished=True)]
    merged = steps[0]
    for step in steps[1:]:
        merged = _merge(merged, step, OutputKind.DELTA)
    assert merged.finished
    assert [(c.index, c.text, c.token_ids, c.finish_reason) for c in merged.outputs] == [
        (0, "Once upon", [5, 6], "length"), (1, "The dog", [7, 8, 2], "stop")]
    assert [list(p) for p in merged.outputs[1].logprobs] == [[7], [8], [2]]


def test_snapshots_keep_the_latest_and_errors_pass_through():
    a, b = _out([_c(0, "Once", [5])]), _out([_c(0, "Once upon", [5, 6])])
    assert _merge(a, b, OutputKind.CUMULATIVE) is b
    error = RuntimeError("engine gone")
    assert _merge(a, error, OutputKind.DELTA) is error
