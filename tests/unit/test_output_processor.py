"""OutputProcessor: sequences that end in the middle of a step's ids, or in one batch of outputs."""
import pytest
from test_detokenizer import DEMO, reference, story_split

from pagedllm.core.messages import EngineCoreOutput, TokenLogprobs
from pagedllm.engine.output_processor import OutputKind, OutputProcessor
from pagedllm.engine.tokenizer import load_tokenizer
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


def test_output_processor_cuts_the_ids_after_a_stop_string():
    """A speculative step's ids past the stop string are dropped with their logprobs, and the stop string
    ends the sequence even where the core ended it by length in the same step (as vLLM)."""
    tok = load_tokenizer(DEMO)
    prompt, output = story_split(tok)
    ends_at = next(n for n in range(len(output) + 1) if "cat sat" in reference(tok, prompt, output[:n]))
    lps = [TokenLogprobs([t], [-0.5], 1) for t in output]
    for core_finish, frees in ((None, True), ("length", False)):
        op = OutputProcessor(tok)
        op.add_request("r", None, prompt, SamplingParams(stop=["cat sat"], max_tokens=99, logprobs=0),
                       OutputKind.FINAL, 0.0)
        outs, stopped, _ = op.process([EngineCoreOutput("r", output, lps, finish_reason=core_finish)])
        c = outs[0].outputs[0]
        assert c.token_ids == output[:ends_at] and len(c.logprobs) == ends_at
        assert c.cumulative_logprob == pytest.approx(-0.5 * ends_at)
        assert (c.finish_reason, c.stop_reason, c.text) == ("stop", "cat sat", " upon a time there was a cat. The ")
        assert stopped == (["r"] if frees else [])   # the core must free it only where it has not yet


def test_finished_stats_have_vllms_request_phases(monkeypatch):
    """vLLM's prefill (first scheduled to first token), decode (first to last token) and inference (first
    scheduled to last token) times, and decode time per token after the first, for the server's histograms."""
    from pagedllm.engine import output_processor
    from pagedllm.metrics import StepStats
    op = OutputProcessor(None)
    op.add_request("r", None, [1, 2], SamplingParams(max_tokens=3, detokenize=False), OutputKind.FINAL, 10.0)
    steps = [(11.0, StepStats(first_scheduled_ids=["r"], queue_times=[0.5]), []),
             (12.0, StepStats(), [EngineCoreOutput("r", [5])]),
             (13.0, StepStats(), [EngineCoreOutput("r", [6])]),
             (15.0, StepStats(), [EngineCoreOutput("r", [7], finish_reason="length")])]
    for now, stats, outputs in steps:
        monkeypatch.setattr(output_processor.time, "time", lambda: now)
        op.process(outputs, stats)
    f = stats.finished[0]
    assert (f.prefill_time, f.decode_time, f.inference_time) == (1.5, 3.0, 4.5)
    assert f.mean_time_per_output_token == 1.5
    assert f.queued_time == 0.5   # carried to the finish, where vLLM observes it


def test_finished_stats_of_0_and_1_token_sequences_have_vllms_zeros(monkeypatch):
    """vLLM's update_from_finished_request gives every finished request every phase, 0 where it did not happen:
    one token, decode time and time per output token 0; scheduled but failed before its first token, its end as
    its first and last output (decode 0); never scheduled, all 0. They had none (None: not observed), so the
    histograms' counts were short of vLLM's by those sequences."""
    from pagedllm.engine import output_processor
    from pagedllm.metrics import StepStats

    def finished(steps, **params):
        op = OutputProcessor(None)
        op.add_request("r", None, [1, 2], SamplingParams(detokenize=False, **params), OutputKind.FINAL, 10.0)
        for now, stats, outputs in steps:
            monkeypatch.setattr(output_processor.time, "time", lambda: now)
            op.process(outputs, stats)
        return stats.finished[0]

    def phases(f):
        return f.prefill_time, f.decode_time, f.inference_time, f.mean_time_per_output_token
    scheduled = (11.0, StepStats(first_scheduled_ids=["r"], queue_times=[1.0]), [])
    one = finished([scheduled, (12.5, StepStats(), [EngineCoreOutput("r", [5], finish_reason="length")])],
                   max_tokens=1)
    assert (one.num_generation_tokens, phases(one)) == (1, (1.5, 0.0, 1.5, 0.0))
    failed = finished([scheduled, (14.0, StepStats(), [EngineCoreOutput("r", [], finish_reason="error", error="x")])])
    assert (failed.num_generation_tokens, phases(failed)) == (0, (3.0, 0.0, 3.0, 0.0))
    unscheduled = finished([(14.0, StepStats(), [EngineCoreOutput("r", [], finish_reason="error", error="x")])])
    assert phases(unscheduled) == (0.0, 0.0, 0.0, 0.0)
    assert (one.queued_time, failed.queued_time, unscheduled.queued_time) == (1.0, 1.0, 0.0)


def test_finished_stats_carry_the_request_parameters():
    """vLLM's request_params_max_tokens (each sequence), request_params_n and request_max_num_generation_tokens
    (the longest sequence's tokens, once per request)."""
    from pagedllm.metrics import StepStats
    op = OutputProcessor(None)
    op.add_request("r", None, [1, 2], SamplingParams(n=2, max_tokens=3, detokenize=False), OutputKind.FINAL, 0.0)
    stats = StepStats()
    op.process([EngineCoreOutput("r#0", [5, 6, 7], finish_reason="length"),
                EngineCoreOutput("r#1", [5], finish_reason="stop")], stats)
    assert [(f.max_tokens, f.num_generation_tokens) for f in stats.finished] == [(3, 3), (3, 1)]
    assert (stats.params_n, stats.max_num_generation_tokens) == ([2], [3])


def test_n_sequences_count_as_vllms_child_requests(monkeypatch):
    """vLLM runs each of a request's n sequences as its own request: time to first token, inter-token latency
    and a finished record (end-to-end latency, phases, the whole prompt, its own tokens) come for each one,
    each when it ends; n and the longest sequence's tokens come once, when the last ends. They came once per
    request (latencies once a step for all n; generation tokens summed)."""
    from pagedllm.engine import output_processor
    from pagedllm.metrics import StepStats
    op = OutputProcessor(None)
    op.add_request("r", None, [1, 2], SamplingParams(n=3, max_tokens=3, detokenize=False), OutputKind.FINAL, 10.0)
    ids = ["r#0", "r#1", "r#2"]
    steps = [(11.0, StepStats(first_scheduled_ids=ids, queue_times=[0.5] * 3), []),
             (12.0, StepStats(), [EngineCoreOutput(i, [5], num_cached_tokens=c) for i, c in zip(ids, (0, 0, 2))]),
             (13.0, StepStats(), [EngineCoreOutput("r#0", [6], finish_reason="stop"), EngineCoreOutput("r#1", [6]),
                                  EngineCoreOutput("r#2", [6])]),
             (15.0, StepStats(), [EngineCoreOutput(i, [7], finish_reason="length") for i in ids[1:]])]
    seen = []
    for now, stats, outputs in steps:
        monkeypatch.setattr(output_processor.time, "time", lambda: now)
        op.process(outputs, stats)
        seen.append(stats)
    assert [s.time_to_first_tokens for s in seen] == [[], [2.0] * 3, [], []]
    assert [s.inter_token_latencies for s in seen] == [[], [], [1.0] * 3, [2.0] * 2]
    assert [len(s.finished) for s in seen] == [0, 0, 1, 2]
    first, rest = seen[2].finished[0], seen[3].finished
    assert (first.finish_reason, first.e2e_latency, first.num_prompt_tokens, first.num_generation_tokens) == (
        "stop", 3.0, 2, 2)
    assert (first.prefill_time, first.decode_time, first.inference_time, first.mean_time_per_output_token) == (
        1.5, 1.0, 2.5, 1.0)
    assert [(f.finish_reason, f.e2e_latency, f.num_generation_tokens, f.num_cached_tokens) for f in rest] == [
        ("length", 5.0, 3, 0), ("length", 5.0, 3, 2)]
    assert [(s.params_n, s.max_num_generation_tokens) for s in seen] == [([], [])] * 3 + [([3], [3])]


def test_a_failed_sequences_siblings_each_count_as_finished():
    """The siblings a failed sequence ends ("error") get their finished record in the same step (request_success
    counts each sequence, as before)."""
    from pagedllm.metrics import StepStats
    op = OutputProcessor(None)
    op.add_request("r", None, [1, 2], SamplingParams(n=2, max_tokens=9, detokenize=False), OutputKind.FINAL, 0.0)
    stats = StepStats()
    op.process([EngineCoreOutput("r#0", [7], finish_reason="error", error="boom")], stats)
    assert [f.finish_reason for f in stats.finished] == ["error", "error"] and stats.params_n == [2]


def test_finished_stats_carry_the_cached_prompt_tokens():
    """For vLLM's request_prefill_kv_computed_tokens: the prompt tokens the prefix cache held."""
    from pagedllm.metrics import StepStats
    op = OutputProcessor(None)
    op.add_request("r", None, list(range(40)), SamplingParams(max_tokens=1, detokenize=False), OutputKind.FINAL, 0.0)
    stats = StepStats()
    op.process([EngineCoreOutput("r", [5], finish_reason="length", num_cached_tokens=32)], stats)
    assert (stats.finished[0].num_prompt_tokens, stats.finished[0].num_cached_tokens) == (40, 32)


def test_outputs_carry_vllms_encoder_and_kv_transfer_attributes_as_none():
    """A vLLM script reading out.encoder_prompt or out.kv_transfer_params got AttributeError."""
    op = OutputProcessor(None)
    op.add_request("r", None, [1, 2], SamplingParams(max_tokens=1, detokenize=False), OutputKind.FINAL, 0.0)
    out = op.process([EngineCoreOutput("r", [5], finish_reason="length")])[0][0]
    assert (out.encoder_prompt, out.encoder_prompt_token_ids, out.kv_transfer_params) == (None, None, None)
    assert out.outputs[0].kv_transfer_params is None


def test_detokenize_false_leaves_the_logprobs_token_texts_none():
    """vLLM reads no tokenizer for a request with detokenize=False, so its logprobs' decoded_token are None (prompt
    logprobs too); they were decoded here, costing a decode per entry the caller said it did not want."""
    from pagedllm import LLM
    llm = LLM(device="cpu")
    ids = llm.get_tokenizer().encode("Once upon a time")
    [plain, raw] = llm.generate([ids, ids], [SamplingParams(max_tokens=3, logprobs=2, prompt_logprobs=1),
                                             SamplingParams(max_tokens=3, logprobs=2, prompt_logprobs=1,
                                                            detokenize=False)], use_tqdm=False)
    for out, decoded in ((plain, True), (raw, False)):
        entries = [e for p in out.outputs[0].logprobs + out.prompt_logprobs[1:] for e in p.values()]
        assert all((e.decoded_token is not None) == decoded for e in entries)
    assert raw.outputs[0].text == "" and raw.outputs[0].token_ids == plain.outputs[0].token_ids


def test_completion_outputs_name_their_adapter_as_vllms():
    """vLLM's CompletionOutput has lora_request and routed_experts, and RequestOutput's metrics default to None:
    out.outputs[0].lora_request was an AttributeError, RequestOutput(...) without metrics a TypeError."""
    from pagedllm.lora.request import LoRARequest
    from pagedllm.outputs import RequestOutput
    lora = LoRARequest("a", 1, "/nowhere")
    op = OutputProcessor(None)
    op.add_request("r", None, [1, 2], SamplingParams(max_tokens=1, detokenize=False), OutputKind.FINAL, 0.0, lora)
    op.add_request("s", None, [1, 2], SamplingParams(max_tokens=1, detokenize=False), OutputKind.FINAL, 0.0)
    outs = op.process([EngineCoreOutput("r", [5], finish_reason="length"),
                       EngineCoreOutput("s", [5], finish_reason="length")])[0]
    assert [(o.lora_request, o.outputs[0].lora_request) for o in outs] == [(lora, lora), (None, None)]
    assert outs[0].outputs[0].routed_experts is None
    assert RequestOutput("x", None, [1], None, [], True).metrics is None


def test_cumulative_outputs_leave_out_a_sequence_whose_finish_was_sent():
    """n = 2, CUMULATIVE: once a sequence's finished output has gone out, later outputs of the request hold only
    the sequences still running, as vLLM 0.26's ParentRequest.get_outputs (a child finished and returned is not
    output again); each sequence's finish comes once, in full."""
    op = OutputProcessor(None)
    op.add_request("r", None, [1, 2], SamplingParams(n=2, max_tokens=9, detokenize=False), OutputKind.CUMULATIVE,
                   0.0)
    [first], _, _ = op.process([EngineCoreOutput("r#0", [5], finish_reason="stop"), EngineCoreOutput("r#1", [6])])
    assert [(c.index, c.token_ids, c.finish_reason) for c in first.outputs] == [(0, [5], "stop"), (1, [6], None)]
    [second], _, _ = op.process([EngineCoreOutput("r#1", [7])])
    assert [(c.index, c.token_ids) for c in second.outputs] == [(1, [6, 7])] and not second.finished
    [last], _, _ = op.process([EngineCoreOutput("r#1", [8], finish_reason="length")])
    assert [(c.index, c.token_ids, c.finish_reason) for c in last.outputs] == [(1, [6, 7, 8], "length")]
    assert last.finished
