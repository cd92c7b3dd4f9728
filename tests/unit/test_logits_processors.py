"""Penalties, logit bias, allowed token ids and bad words against direct per-row references (float32, exact)
and against transformers' own logits processors, in batches that mix rows with and without each feature."""
import pytest
import torch
from transformers import NoBadWordsLogitsProcessor, RepetitionPenaltyLogitsProcessor

from pagedllm.sample.logits_processors import apply_logits_processors, build_logits_processors
from pagedllm.sample.penalties import Penalties, PenaltyTable
from pagedllm.sample.sampler import Sampler, SamplingMetadata
from pagedllm.sampling_params import SamplingParams

V = 64
F32 = torch.float32


def random_logits(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 3


def random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def penalised(params: list[SamplingParams], prompts: list[list[int]], outputs: list[list[int]]) -> Penalties:
    """A table holding the rows' prompts and outputs the way the runner fills it: outputs recorded step by step."""
    table = PenaltyTable(V, "cpu")
    slots = [table.slot(f"r{i}", prompts[i], len(prompts[i])) if p.uses_penalties else None
             for i, p in enumerate(params)]
    pen = Penalties.build(table, params, slots, "cpu")
    for step in range(max(map(len, outputs))):
        rows = [i for i, s in enumerate(slots) if s is not None and step < len(outputs[i])]
        if rows:
            table.record(torch.tensor([slots[i] for i in rows]), torch.tensor([outputs[i][step] for i in rows]))
    return pen


def process(logits, params, prompts=None, outputs=None, banned=None):
    n = len(params)
    prompts, outputs = prompts or [[] for _ in range(n)], outputs or [[] for _ in range(n)]
    pen = penalised(params, prompts, outputs) if any(p.uses_penalties for p in params) else None
    recent = [(outputs[i], None) for i in range(n)]
    procs = build_logits_processors(params, pen, recent, None, "cpu")
    return apply_logits_processors(logits, procs, banned)


# ---- references: one row at a time, straight from vLLM's definitions ----------------------------------------

def ref_penalties(row, p: SamplingParams, prompt, output):
    row = row.clone()
    rep = torch.tensor(p.repetition_penalty, dtype=F32)
    for t in set(prompt) | set(output):
        row[t] = row[t] / rep if row[t] > 0 else row[t] * rep
    for t in set(output):
        row[t] = row[t] - torch.tensor(p.frequency_penalty, dtype=F32) * output.count(t)
        row[t] = row[t] - torch.tensor(p.presence_penalty, dtype=F32)
    return row


def ref_bad_words(row, words, output):
    row = row.clone()
    for w in words:
        if len(w) - 1 <= len(output) and (len(w) == 1 or output[len(output) - len(w) + 1:] == w[:-1]):
            row[w[-1]] = -float("inf")
    return row


def ref_all(row, p: SamplingParams, prompt, output, banned):
    """vLLM v1's order: allowed ids, bad words, min_tokens bans, logit bias, penalties (a bias is finite or -inf,
    so the bans and the bias commute)."""
    row = row.clone()
    if p.allowed_token_ids:
        keep = torch.full_like(row, -float("inf"))
        keep[p.allowed_token_ids] = row[p.allowed_token_ids]
        row = keep
    row = ref_bad_words(row, p.bad_words_token_ids, output)
    row[banned] = -float("inf")
    for t, b in (p.logit_bias or {}).items():
        row[t] = row[t] + torch.tensor(b, dtype=F32)
    return ref_penalties(row, p, prompt, output)


def test_penalties_match_reference_in_a_mixed_batch():
    params = [SamplingParams(repetition_penalty=1.3), SamplingParams(),
              SamplingParams(presence_penalty=0.7, frequency_penalty=-0.4),
              SamplingParams(repetition_penalty=0.8, presence_penalty=-1.5, frequency_penalty=2.0),
              SamplingParams(frequency_penalty=0.3), SamplingParams(temperature=0.0, repetition_penalty=2.0)]
    prompts = [random_ids(9 + i, seed=i) for i in range(len(params))]
    outputs = [random_ids(3 * i + 1, seed=100 + i) for i in range(len(params))]
    logits = random_logits(len(params))
    got = process(logits, params, prompts, outputs)
    for i, p in enumerate(params):
        assert torch.equal(got[i], ref_penalties(logits[i], p, prompts[i], outputs[i])), i
    assert torch.equal(got[1], logits[1])    # a row without penalties is untouched
    assert not torch.equal(got[2], logits[2])


@pytest.mark.parametrize("penalty", [0.5, 1.2, 1.7])
def test_repetition_penalty_matches_transformers(penalty):
    prompts = [random_ids(12, seed=1), random_ids(5, seed=2)]
    outputs = [random_ids(7, seed=3), random_ids(20, seed=4)]
    logits = random_logits(2, seed=5)
    got = process(logits, [SamplingParams(repetition_penalty=penalty)] * 2, prompts, outputs)
    hf = RepetitionPenaltyLogitsProcessor(penalty)
    for i in range(2):
        want = hf(torch.tensor([prompts[i] + outputs[i]]), logits[i:i + 1].clone())[0]
        assert torch.equal(got[i], want)


def test_bad_words_match_reference_and_transformers():
    words = [[5], [7, 9], [1, 2, 3], [4, 4], [9, 8, 11], [7, 12]]
    outputs = [[], [7], [1, 2], [3, 1, 2], [4], [4, 4], [9, 8], [0, 9, 8], [7, 9, 7]]
    params = [SamplingParams(bad_words=["x"]) for _ in outputs] + [SamplingParams()]
    for p in params[:-1]:
        p.bad_words_token_ids = words
    logits = random_logits(len(params), seed=6)
    got = process(logits, params, outputs=outputs + [[7]])
    hf = NoBadWordsLogitsProcessor(words)
    for i, out in enumerate(outputs):
        assert torch.equal(got[i], ref_bad_words(logits[i], words, out)), i
        want = hf(torch.tensor([out], dtype=torch.int64).view(1, -1), logits[i:i + 1].clone())[0]
        assert torch.equal(got[i], want), i
    assert torch.isinf(got[2, 3]) and torch.isinf(got[6, 11]) and torch.isinf(got[1, 12])
    assert torch.isinf(got[0]).sum() == 1    # no output yet: only the one-token word
    assert torch.equal(got[-1], logits[-1])


def test_bad_words_take_the_in_flight_token_from_the_device():
    """The output's last token still being sampled: its id comes from the last step's sampled ids."""
    words = [[3, 4, 6], [8, 2]]
    params = [SamplingParams(bad_words=["x"]) for _ in range(3)]
    for p in params:
        p.bad_words_token_ids = words
    outputs = [[1, 3, 4], [8], [5, 3]]
    in_flight_ids = torch.tensor([0, 4, 0, 8])      # rows 0 and 1: their last output is in flight
    recent = [(outputs[0][:-1], 1), (outputs[1][:-1], 3), (outputs[2], None)]
    logits = random_logits(3, seed=7)
    procs = build_logits_processors(params, None, recent, in_flight_ids, "cpu")
    assert not procs.reusable
    got = apply_logits_processors(logits, procs, None)
    for i in range(3):
        assert torch.equal(got[i], ref_bad_words(logits[i], words, outputs[i])), i
    assert torch.isinf(got[0, 6]) and torch.isinf(got[1, 2])


def test_allowed_token_ids_and_logit_bias_match_reference():
    params = [SamplingParams(allowed_token_ids=[3, 17, 40]), SamplingParams(logit_bias={"5": 100, 9: -100.0}),
              SamplingParams(),
              SamplingParams(allowed_token_ids=[0, 63], logit_bias={63: 2.5, 1: 7})]
    logits = random_logits(len(params), seed=8)
    got = process(logits, params)
    for i, p in enumerate(params):
        assert torch.equal(got[i], ref_all(logits[i], p, [], [], [])), i
    assert torch.isfinite(got[0]).sum() == 3 and torch.isfinite(got[3]).sum() == 2
    assert got[1, 5] == logits[1, 5] + 100 and torch.equal(got[2], logits[2])


def test_every_processor_together_in_vllm_order():
    bad = [[6], [2, 11]]
    params = [SamplingParams(allowed_token_ids=list(range(0, V, 3)), logit_bias={3: -4.0, 12: 3.0},
                             repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.25,
                             bad_words=["x"]),
              SamplingParams(logit_bias={1: 9.0}, repetition_penalty=0.6, bad_words=["y"]),
              SamplingParams(min_tokens=3)]
    params[0].bad_words_token_ids = params[1].bad_words_token_ids = bad
    prompts, outputs = [[3, 6, 9, 9], [1, 2], [4]], [[12, 2, 12], [2], [5]]
    banned = [[], [1, 40], [2, 3]]
    logits = random_logits(3, seed=9)
    got = process(logits, params, prompts, outputs, banned)
    for i, p in enumerate(params):
        assert torch.equal(got[i], ref_all(logits[i], p, prompts[i], outputs[i], banned[i])), i


def test_sampler_applies_processors_but_reports_raw_logprobs():
    logits = random_logits(3, seed=10)
    top = logits.argmax(dim=-1).tolist()
    params = [SamplingParams(temperature=0.0, logprobs=1, logit_bias={top[0]: -100}),
              SamplingParams(temperature=0.0, logprobs=1, allowed_token_ids=[7]),
              SamplingParams(temperature=1.0, logprobs=1, bad_words=["x"], seed=1)]
    params[2].bad_words_token_ids = [[top[2]]]
    procs = build_logits_processors(params, None, [None] * 3, None, "cpu")
    meta = SamplingMetadata.build(params, [None, None, 1], [[], [], []], "cpu", procs)
    before = logits.clone()
    out = Sampler()(logits, meta, generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits, before)                  # the caller's logits are not modified
    sampled = out.sampled_token_ids.tolist()
    second = logits[0].topk(2).indices[1].item()
    assert sampled[0] == second and sampled[1] == 7 and sampled[2] != top[2]
    raw = logits.log_softmax(dim=-1)
    assert torch.equal(out.logprobs[:, 0], raw.gather(1, out.sampled_token_ids.unsqueeze(1))[:, 0])


def test_rows_without_processors_build_none():
    assert build_logits_processors([SamplingParams()] * 2, None, [None] * 2, None, "cpu").allowed is None
    meta = SamplingMetadata.build([SamplingParams()], [None], [[]], "cpu")
    assert meta.processors is None


def test_penalty_table_reuses_freed_slots_with_fresh_state():
    table = PenaltyTable(V, "cpu")
    slots = [table.slot(f"r{i}", [i], 1) for i in range(5)]          # grows past its first 4 slots
    assert sorted(slots) == list(range(5))
    table.record(torch.tensor(slots), torch.tensor([9] * 5))
    table.release("r2")
    again = table.slot("new", [33], 1)
    assert again == slots[2]
    assert table.output_counts[again].sum() == 0 and table.prompt_mask[again].nonzero().flatten().tolist() == [33]
    assert table.output_counts[slots[4], 9] == 1 and table.prompt_mask[slots[4], 4]


def test_a_bias_beyond_100_or_minus_inf_bans_the_token_as_vllms():
    """vLLM's SamplingParams adds a bias as given: -1e9 or -inf bans a token, greedy and sampled alike."""
    logits = random_logits(3, seed=11)
    top = logits.argmax(dim=-1).tolist()
    params = [SamplingParams(temperature=0.0, logit_bias={top[0]: -1e9}),
              SamplingParams(temperature=0.0, logit_bias={top[1]: float("-inf")}),
              SamplingParams(temperature=1.0, seed=3, logit_bias={t: float("-inf") for t in range(V) if t != 5})]
    procs = build_logits_processors(params, None, [None] * 3, None, "cpu")
    meta = SamplingMetadata.build(params, [None, None, 3], [[], [], []], "cpu", procs)
    sampled = Sampler()(logits, meta, generator=torch.Generator().manual_seed(0)).sampled_token_ids.tolist()
    assert sampled == [logits[0].topk(2).indices[1].item(), logits[1].topk(2).indices[1].item(), 5]
