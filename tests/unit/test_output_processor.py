"""OutputProcessor: a request's sequences that end in one batch of outputs."""
from pagedllm.core.messages import EngineCoreOutput
from pagedllm.engine.output_processor import OutputKind, OutputProcessor
from pagedllm.sampling_params import SamplingParams


def test_a_failed_sequence_ends_its_siblings_whatever_comes_after_it():
    """n = 2: the first sequence fails, and the second's token of the same step comes after it in the batch.
    The sibling stays ended ("error"): the request finishes (it used to wait for ever: LLM.generate's
    KeyError)."""
    for order in ((0, 1), (1, 0)):
        op = OutputProcessor(None)
        op.add_request("r", None, [1, 2], SamplingParams(n=2, max_tokens=9, detokenize=False), OutputKind.FINAL, 0.0)
        assert op.process([EngineCoreOutput("r#0", [5]), EngineCoreOutput("r#1", [6])])[0] == []
        step = {0: EngineCoreOutput("r#0", [7], finish_reason="error", error="boom"),
                1: EngineCoreOutput("r#1", [8])}
        outs, stopped, errors = op.process([step[i] for i in order])
        assert [c.finish_reason for c in outs[0].outputs] == ["error", "error"] and outs[0].finished
        assert sorted(stopped) == ["r#0", "r#1"] and errors["r"].error == "boom"
        assert outs[0].outputs[1].token_ids == ([6] if order == (0, 1) else [6, 8])
