import random

import pytest
import torch

from pagedllm.sample.sampler import Sampler, SamplingMetadata, position_seed
from pagedllm.sampling_params import SamplingParams
from pagedllm.spec_decode import rejection_sampler as rs
from pagedllm.spec_decode.rejection_sampler import rejection_sample


def make_meta(params: list[SamplingParams], seeds=None) -> SamplingMetadata:
    n = len(params)
    return SamplingMetadata.build(params, seeds or [None] * n, [[] for _ in range(n)], "cpu")


def position_meta(params: list[SamplingParams], num_draft: list[int], first: list[int]) -> SamplingMetadata:
    """As the runner builds it: each position with its row's parameters and its token's seed (the row's first
    position samples output index first[i])."""
    per_position = [(p, None if p.seed is None else position_seed(p.seed, f + j))
                    for p, s, f in zip(params, num_draft, first) for j in range(s + 1)]
    return make_meta([p for p, _ in per_position], [seed for _, seed in per_position])


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def starts(num_draft: list[int]) -> list[int]:
    out, start = [], 0
    for s in num_draft:
        out.append(start)
        start += s + 1
    return out


def rows(out) -> list[list[int]]:
    """Each row's emitted tokens, padding dropped (and checked)."""
    result = []
    for ids, n in zip(out.output_token_ids.tolist(), out.num_emitted.tolist()):
        assert all(t == -1 for t in ids[n:]) and all(t >= 0 for t in ids[:n])
        result.append(ids[:n])
    return result


# ---- greedy ------------------------------------------------------------------------------------------------

def greedy_case(num_draft: list[int], vocab: int, seed: int):
    """Random logits; row i's drafts follow the argmax chain for a random number of positions, then differ."""
    rng = random.Random(seed)
    logits = torch.randn(sum(num_draft) + len(num_draft), vocab, generator=seeded(seed))
    argmax = logits.argmax(dim=-1).tolist()
    drafts, expected = [], []
    for start, s in zip(starts(num_draft), num_draft):
        match = rng.randrange(s + 1)
        row = [argmax[start + j] if j < match else (argmax[start + j] + rng.randrange(1, vocab)) % vocab
               for j in range(s)]
        drafts += row
        expected.append(argmax[start:start + match + 1])
    return logits, torch.tensor(drafts), expected


def test_greedy_follows_the_argmax_chain():
    num_draft = [1, 2, 3, 4, 5, 1, 3, 2, 4, 4]
    for seed in range(5):
        logits, drafts, expected = greedy_case(num_draft, 50, seed)
        meta = make_meta([SamplingParams(temperature=0.0)] * len(num_draft))
        out = rejection_sample(logits, num_draft, drafts, meta, None)
        assert out.output_token_ids.shape == (len(num_draft), 6) and out.output_token_ids.dtype == torch.int64
        assert rows(out) == expected


def test_mixed_greedy_and_random_rows():
    num_draft = [3, 1, 4, 2, 2]
    logits, drafts, expected = greedy_case(num_draft, 40, seed=3)
    # Row 1 (random) always accepts: its draft takes all the probability; row 3 (random) never does:
    # its first draft is outside its top-k.
    s1, s3 = starts(num_draft)[1], starts(num_draft)[3]
    logits[s1, 7] = 1e4
    drafts[sum(num_draft[:1])] = 7
    logits[s3, 9] = -1e4
    drafts[sum(num_draft[:3])] = 9
    greedy = SamplingParams(temperature=0.0)
    params = [greedy, SamplingParams(temperature=0.8), greedy, SamplingParams(top_k=5), greedy]
    out = rows(rejection_sample(logits, num_draft, drafts, make_meta(params), seeded(0)))
    for i in (0, 2, 4):
        assert out[i] == expected[i]
    assert out[1][0] == 7 and len(out[1]) == 2
    assert len(out[3]) == 1 and out[3][0] != 9
    assert logits[s3].topk(5).indices.tolist().count(out[3][0]) == 1


def test_processors_are_refused():
    meta = make_meta([SamplingParams()])
    meta.banned_token_ids = [[1]]
    with pytest.raises(AssertionError):
        rejection_sample(torch.zeros(2, 4), [1], torch.tensor([0]), meta, None)


# ---- statistics: emitted tokens follow the target ---------------------------------------------------------

V = 6
NUM_ROWS = 20_000
LOGITS = torch.tensor([[0.3, -0.5, 0.9, 0.1, -1.0, 0.6],    # position 0 (scores draft 0 = token 2)
                       [0.2, 0.8, -0.3, 1.0, -0.7, 0.0],    # position 1 (scores draft 1 = token 3)
                       [0.0, 0.5, 0.1, -0.2, 0.4, -0.9]])   # bonus
DRAFTS = [2, 3]


def reference_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                    min_p: float) -> torch.Tensor:
    """From the definitions, float64, one position: softmax(l / T), drop p < min_p * max p, keep the top k,
    then the smallest most-likely prefix whose probability reaches top_p."""
    probs = torch.softmax(logits.double() / temperature, dim=0)
    order = [i for i in probs.argsort(descending=True).tolist() if probs[i] >= min_p * probs.max()]
    keep = order[:top_k] if top_k > 0 else order
    kept_probs = probs[keep] / probs[keep].sum()
    cum, n = 0.0, 0
    while n < len(keep):
        cum += kept_probs[n].item()
        n += 1
        if cum >= top_p:
            break
    mask = torch.zeros_like(probs)
    mask[keep[:n]] = 1
    return probs * mask / (probs * mask).sum()


def chi_square_pvalue(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness of fit of the token counts to probs; tokens the target excludes must never appear."""
    counts = torch.bincount(tokens, minlength=len(probs)).double()
    support = probs > 0
    assert counts[~support].sum() == 0, counts
    expected = probs[support] * len(tokens)
    stat = ((counts[support] - expected) ** 2 / expected).sum()
    dof = torch.tensor(support.sum().item() - 1, dtype=torch.float64)
    return torch.special.gammaincc(dof / 2, stat / 2).item()


def sample_many(temperature: float, top_k: int, top_p: float, min_p: float, seed: int, seeded_rows: bool):
    """seeded_rows: each row a request with its own seed (the coupled draws), else none seeded."""
    logits = LOGITS.repeat(NUM_ROWS, 1)
    params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                             seed=seed * NUM_ROWS + i if seeded_rows else None) for i in range(NUM_ROWS)]
    positions = position_meta(params, [2] * NUM_ROWS, [0] * NUM_ROWS) if seeded_rows else None
    out = rejection_sample(logits, [2] * NUM_ROWS, torch.tensor(DRAFTS * NUM_ROWS), make_meta(params),
                           seeded(seed), position_meta=positions)
    return out.output_token_ids, out.num_emitted


def pvalues(temperature: float, top_k: int, top_p: float, min_p: float, seed: int,
            seeded_rows: bool = False) -> tuple[float, float]:
    """p-values of: the first emitted token ~ p_0; the second, where draft 0 was accepted, ~ p_1."""
    tokens, num_emitted = sample_many(temperature, top_k, top_p, min_p, seed, seeded_rows)
    p = [reference_probs(LOGITS[j], temperature, top_k, top_p, min_p) for j in range(2)]
    second = tokens[num_emitted >= 2, 1]
    assert len(second) > NUM_ROWS // 10
    return chi_square_pvalue(tokens[:, 0], p[0]), chi_square_pvalue(second, p[1])


# (temperature, top_k, top_p, min_p)
SETTINGS = [(1.0, 0, 1.0, 0.0), (0.6, 0, 1.0, 0.0), (1.7, 0, 1.0, 0.0), (1.0, 4, 1.0, 0.0), (1.0, 0, 0.7, 0.0),
            (1.0, 0, 1.0, 0.4), (0.8, 5, 0.8, 0.1)]


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", SETTINGS)
def test_emitted_tokens_follow_the_target(temperature, top_k, top_p, min_p):
    for pvalue in pvalues(temperature, top_k, top_p, min_p, seed=1):
        assert pvalue > 1e-3


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [SETTINGS[0], SETTINGS[-1]])
def test_seeded_rows_follow_the_target(temperature, top_k, top_p, min_p):
    for pvalue in pvalues(temperature, top_k, top_p, min_p, seed=1, seeded_rows=True):
        assert pvalue > 1e-3


def test_biased_coupling_fails_the_test(monkeypatch):
    """The coupled draws taken from position 0's seed at every position: the second token is not ~ p_1."""
    build = rs.SamplingMetadata.build

    def first_seed_everywhere(params, seeds, banned, device):
        return build(params, [seeds[i - i % 3] for i in range(len(seeds))], banned, device)
    monkeypatch.setattr(rs.SamplingMetadata, "build", first_seed_everywhere)
    assert min(pvalues(*SETTINGS[0], seed=1, seeded_rows=True)) < 1e-9


def _biased(monkeypatch, flaw: str):
    if flaw == "recover from p":   # the rejected draft stays in the recovery distribution
        monkeypatch.setattr(rs, "recovery_probs", lambda probs, rejected_draft, rejected: probs)
    else:                          # every draft accepted
        monkeypatch.setattr(rs, "accept_drafts", lambda drafts, *args: torch.ones_like(drafts, dtype=torch.bool))


@pytest.mark.parametrize("flaw", ["recover from p", "always accept"])
@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [SETTINGS[0], SETTINGS[-1]])
def test_biased_sampler_fails_the_test(monkeypatch, flaw, temperature, top_k, top_p, min_p):
    _biased(monkeypatch, flaw)
    assert min(pvalues(temperature, top_k, top_p, min_p, seed=1)) < 1e-9


# ---- seeds ---------------------------------------------------------------------------------------------------

def plain_draws(logits: torch.Tensor, params: SamplingParams, first: int) -> list[int]:
    """What plain sampling draws at each of a row's positions (output indices first, first + 1, ...)."""
    return [Sampler()(logits[j:j + 1], make_meta([params], [position_seed(params.seed, first + j)]),
                      seeded(7)).sampled_token_ids.item() for j in range(len(logits))]


def expected_row(drafts: list[int], draws: list[int]) -> list[int]:
    """Drafts accepted while they equal plain sampling's draws, then its draw."""
    n = 0
    while n < len(drafts) and drafts[n] == draws[n]:
        n += 1
    return draws[:n + 1]


def test_seeded_rows_draw_what_plain_sampling_draws():
    """A seeded row emits plain sampling's tokens at its output indices, alone or beside other rows, with any
    number of drafts."""
    vocab = 30
    row_logits = torch.randn(4, vocab, generator=seeded(5))   # a row with 3 drafts
    row_drafts = row_logits[:3].argmax(dim=-1)                # likely accepted, so the draws matter
    others = torch.randn(8, vocab, generator=seeded(6))
    emitted = set()
    for seed in range(8):
        params = SamplingParams(temperature=1.0, top_p=0.95, seed=seed)
        draws = plain_draws(row_logits, params, first=5)
        alone = rejection_sample(row_logits, [3], row_drafts, make_meta([params]), seeded(100),
                                 position_meta=position_meta([params], [3], [5]))
        assert rows(alone)[0] == expected_row(row_drafts.tolist(), draws)
        # The same request second of three, next to rows with other drafts counts and an unseeded neighbour.
        logits = torch.cat((others[:3], row_logits, others[3:8]))
        drafts = torch.cat((torch.tensor([1, 2]), row_drafts, torch.tensor([3, 4, 5, 6])))
        batch_params = [SamplingParams(seed=99), params, SamplingParams(temperature=0.5)]
        batch = rejection_sample(logits, [2, 3, 4], drafts, make_meta(batch_params), seeded(200 + seed),
                                 position_meta=position_meta(batch_params, [2, 3, 4], [0, 5, 9]))
        assert rows(batch)[1] == rows(alone)[0]
        # One draft only: its first tokens are plain sampling's too.
        one = rejection_sample(row_logits[:2], [1], row_drafts[:1], make_meta([params]), seeded(3),
                               position_meta=position_meta([params], [1], [5]))
        assert rows(one)[0] == expected_row(row_drafts[:1].tolist(), draws[:2])
        emitted.add(tuple(rows(alone)[0]))
    assert len(emitted) > 1   # the seed matters at all


# ---- synthetic acceptance ----------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_synthetic_acceptance_rates(temperature):
    num_rows, s, vocab = 20_000, 4, 8
    logits = torch.randn(num_rows * (s + 1), vocab, generator=seeded(0))
    drafts = torch.randint(vocab, (num_rows * s,), generator=seeded(1))
    meta = make_meta([SamplingParams(temperature=temperature)] * num_rows)
    out = rejection_sample(logits, [s] * num_rows, drafts, meta, seeded(2), synthetic_rates=[0.8] * s)
    accepted = out.num_emitted - 1
    for j in range(s):
        assert abs((accepted > j).double().mean().item() - 0.8 ** (j + 1)) < 0.015
    if temperature == 0.0:   # greedy rows emit the argmax of the position after the accepted drafts
        at = torch.arange(num_rows) * (s + 1) + accepted
        assert torch.equal(out.output_token_ids.gather(1, accepted.unsqueeze(1)).squeeze(1),
                           logits[at].argmax(dim=-1))
    zero = rejection_sample(logits, [s] * num_rows, drafts, meta, seeded(2), synthetic_rates=[0.0] * s)
    one = rejection_sample(logits, [s] * num_rows, drafts, meta, seeded(2), synthetic_rates=[1.0] * s)
    assert (zero.num_emitted == 1).all() and (one.num_emitted == s + 1).all()
