import pytest
import torch

from pagedllm.sample.sampler import (_CANDIDATES_MAX_K, Sampler, SamplingMetadata, _top_p_of_candidates, apply_min_p,
                                     apply_temperature, apply_top_k_top_p, position_seed)
from pagedllm.sampling_params import SamplingParams

V = 64


def make_meta(params, seeds=None, banned=None) -> SamplingMetadata:
    n = len(params)
    return SamplingMetadata.build(params, seeds or [None] * n, banned or [[] for _ in range(n)], "cpu")


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_logits(n: int, vocab: int = V, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, vocab, generator=seeded(seed)) * 2


# ---- reference masks: one row at a time, float64, straight from the definitions -------------------------

def ref_top_k(row: torch.Tensor, k: int) -> set[int]:
    if k <= 0 or k >= row.numel():
        return set(range(row.numel()))
    return set(row.topk(k).indices.tolist())


def ref_top_p(row: torch.Tensor, keep: set[int], p: float) -> set[int]:
    """Among `keep` (renormalised), the smallest most-likely set whose probability reaches p."""
    ids = sorted(keep, key=lambda i: -row[i].item())
    probs = torch.softmax(row[ids].double(), dim=0)
    cum, kept = 0.0, []
    for i, prob in zip(ids, probs.tolist()):
        kept.append(i)
        cum += prob
        if cum >= p:
            break
    return set(kept)


def ref_min_p(row: torch.Tensor, min_p: float) -> set[int]:
    probs = torch.softmax(row.double(), dim=0)
    return set(torch.nonzero(probs >= min_p * probs.max()).flatten().tolist())


def kept(masked: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(~torch.isinf(r)).flatten().tolist()) for r in masked]


TOP_K = [0, 1, 5, 17, V, V + 10, 3, 40]
TOP_P = [1.0, 0.9, 0.5, 0.1, 1e-6, 0.75, 0.99, 0.3]
MIN_P = [0.0, 0.1, 0.5, 1.0, 1e-4, 0.05, 0.3, 0.9]


def test_top_k_matches_reference():
    logits = random_logits(len(TOP_K))
    k = torch.tensor(TOP_K)
    expected = [ref_top_k(r, kk) for r, kk in zip(logits, TOP_K)]
    max_k = max(TOP_K)
    assert kept(apply_top_k_top_p(logits.clone(), k, None, max_k)) == expected  # topk-only path
    assert kept(apply_top_k_top_p(logits.clone(), k, torch.ones(len(TOP_K)), max_k)) == expected  # sort path
    small = [i for i, kk in enumerate(TOP_K) if kk < V]      # topk over 40 < V columns
    got = kept(apply_top_k_top_p(logits[small].clone(), k[small], None, max(TOP_K[i] for i in small)))
    assert got == [expected[i] for i in small]


def test_top_p_matches_reference():
    logits = random_logits(len(TOP_P), seed=1)
    got = kept(apply_top_k_top_p(logits.clone(), None, torch.tensor(TOP_P), None))
    assert got == [ref_top_p(r, set(range(V)), p) for r, p in zip(logits, TOP_P)]
    assert all(len(s) >= 1 for s in got)
    assert len(got[4]) == 1  # a tiny top_p still keeps the top token


def test_top_k_then_top_p_matches_reference():
    logits = random_logits(len(TOP_K), seed=2)
    got = kept(apply_top_k_top_p(logits.clone(), torch.tensor(TOP_K), torch.tensor(TOP_P), max(TOP_K)))
    assert got == [ref_top_p(r, ref_top_k(r, k), p) for r, k, p in zip(logits, TOP_K, TOP_P)]


BOUNDED_K = [1, 5, 17, 3, 40, 2, 63, 10]   # every row has a k below V: the candidate path applies


@pytest.mark.parametrize("bounded", [False, True], ids=["sort", "candidates"])
def test_top_k_then_top_p_both_paths_match_reference(bounded):
    logits = random_logits(len(BOUNDED_K), seed=7)
    got = kept(apply_top_k_top_p(logits.clone(), torch.tensor(BOUNDED_K), torch.tensor(TOP_P), max(BOUNDED_K),
                                 bounded))
    assert got == [ref_top_p(r, ref_top_k(r, k), p) for r, k, p in zip(logits, BOUNDED_K, TOP_P)]


def test_candidate_path_keeps_ties_beyond_the_candidates():
    """k = 2 with six tokens tied at the 2nd value: all six stay (as the sort path keeps them), and they count
    in top-p's total although the candidates hold only two of them."""
    row = torch.full((V,), -5.0)
    row[7] = 3.0
    row[[3, 10, 20, 30, 40, 50]] = 2.0
    logits = torch.stack([row, row, row])
    k, p = torch.tensor([2, 2, 2]), torch.tensor([0.999, 0.3, 1.0])
    for bounded in (False, True):
        got = kept(apply_top_k_top_p(logits.clone(), k, p, 2, bounded))
        assert got == [{7, 3, 10, 20, 30, 40, 50}, {7}, {7, 3, 10, 20, 30, 40, 50}], bounded
    # the top token's share of the kept mass: e / (e + 6) = 0.31 >= 0.3 ends the set for p = 0.3;
    # were the ties beyond the candidates left out of the total, it would be e / (e + 1) = 0.73 either way
    got = kept(apply_top_k_top_p(logits.clone(), k, torch.tensor([0.5, 0.5, 0.5]), 2, True))
    assert got == [{7, 3, 10, 20, 30, 40, 50}] * 3


def test_candidate_path_with_rows_masked_by_min_p_and_greedy_rows():
    """-inf logits (min-p's) among the candidates, and a greedy row (k = 0 -> max_k: its draw is discarded)."""
    logits = random_logits(3, seed=8)
    params = [SamplingParams(top_k=30, top_p=0.9, min_p=0.2), SamplingParams(temperature=0),
              SamplingParams(top_k=4, top_p=0.5)]
    meta = make_meta(params)
    assert meta.top_k_bounded and meta.max_top_k == 30
    out = Sampler()(logits.clone(), meta, generator=seeded(0)).sampled_token_ids
    assert out[0].item() in ref_top_p(logits[0], ref_min_p(logits[0], 0.2), 0.9)
    assert out[1].item() == logits[1].argmax().item()
    assert out[2].item() in ref_top_p(logits[2], ref_top_k(logits[2], 4), 0.5)
    assert not make_meta([SamplingParams(top_k=5, top_p=0.5), SamplingParams(top_p=0.5)]).top_k_bounded


def test_top_p_alone_from_candidates_matches_reference(monkeypatch):
    """A vocabulary past the candidates (top-p alone takes them, not the sort) with peaked rows, as a trained
    model's at temperature 0.6-1; p = 1 rows keep everything."""
    from pagedllm.sample import sampler
    monkeypatch.setattr(sampler, "_top_p_sorts_left", 0)
    vocab = 4 * _CANDIDATES_MAX_K
    logits = random_logits(len(TOP_P), vocab, seed=11) * 4
    p = torch.tensor(TOP_P)
    masked = _top_p_of_candidates(logits.clone(), None, p, _CANDIDATES_MAX_K)
    assert masked is not None   # the candidates held every row's set: this path, not the sort
    expected = [ref_top_p(r, set(range(vocab)), pp) for r, pp in zip(logits, TOP_P)]
    assert kept(masked) == expected
    assert kept(apply_top_k_top_p(logits.clone(), None, p, None)) == expected
    assert len(expected[0]) == vocab and 1 < len(expected[1]) < _CANDIDATES_MAX_K


def test_top_p_candidates_that_miss_p_leave_the_row_to_the_sort():
    """A flat row needs more than the candidates: None, logits untouched, and the sort's answer."""
    logits = random_logits(3, seed=12) * 0.01
    p = torch.tensor([0.9, 0.5, 1.0])
    original = logits.clone()
    assert _top_p_of_candidates(logits, None, p, 8) is None and torch.equal(logits, original)
    peaked = random_logits(3, seed=13) * 8
    masked = _top_p_of_candidates(peaked.clone(), None, torch.tensor([0.5, 0.3, 1.0]), 8)
    assert masked is not None
    assert kept(masked) == [ref_top_p(r, set(range(V)), pp) for r, pp in zip(peaked, [0.5, 0.3, 1.0])]


def test_top_p_after_a_miss_sorts_for_a_while(monkeypatch):
    """Flat rows (dummy weights) miss p in their candidates: the next calls sort at once (no topk, no wait for
    the device), then the candidates are tried again; the tokens kept are the same either way."""
    from pagedllm.sample import sampler
    calls = []
    candidates = sampler._top_p_of_candidates
    monkeypatch.setattr(sampler, "_top_p_of_candidates", lambda *a: calls.append(1) or candidates(*a))
    monkeypatch.setattr(sampler, "_top_p_sorts_left", 0)
    vocab, p = 4 * _CANDIDATES_MAX_K, torch.tensor([0.9, 0.5])
    flat = random_logits(2, vocab, seed=14) * 0.01
    expected = [ref_top_p(r, set(range(vocab)), pp) for r, pp in zip(flat, p.tolist())]
    for _ in range(sampler._TOP_P_SORTS_AFTER_A_MISS + 1):
        assert kept(apply_top_k_top_p(flat.clone(), None, p, None)) == expected
    assert len(calls) == 1
    peaked = flat * 800
    assert kept(apply_top_k_top_p(peaked.clone(), None, p, None)) == [ref_top_p(r, set(range(vocab)), pp)
                                                                       for r, pp in zip(peaked, p.tolist())]
    assert len(calls) == 2 and sampler._top_p_sorts_left == 0


def test_top_p_candidates_keep_ties_with_the_last_kept_value():
    row = torch.full((V,), -5.0)
    row[7] = 3.0
    row[[3, 10, 20]] = 2.0   # the top token holds 0.47 < 0.5: one of these is needed, and all three stay
    masked = _top_p_of_candidates(row.unsqueeze(0).clone(), None, torch.tensor([0.5]), 2)
    assert kept(masked) == [{7, 3, 10, 20}]


def test_min_p_matches_reference():
    logits = random_logits(len(MIN_P), seed=3)
    got = kept(apply_min_p(logits.clone(), torch.tensor(MIN_P)))
    assert got == [ref_min_p(r, m) for r, m in zip(logits, MIN_P)]
    assert got[0] == set(range(V)) and len(got[3]) == 1


def test_build_leaves_unused_filters_off():
    params = [SamplingParams(temperature=0, top_k=5, top_p=0.5, min_p=0.1, logprobs=2), SamplingParams(seed=3)]
    meta = make_meta(params, seeds=[1, 3])
    # A greedy row's filters and seed are irrelevant, so they switch nothing on.
    assert meta.top_k is None and meta.top_p is None and meta.min_p is None
    assert meta.seeds == {1: 3} and not meta.all_greedy and meta.max_num_logprobs == 2
    assert meta.banned_token_ids is None
    meta = make_meta([SamplingParams(top_k=5), SamplingParams(top_p=0.5, logprobs=0)], banned=[[1], []])
    assert meta.top_k.tolist() == [5, 0] and meta.top_p.tolist() == [1.0, 0.5] and meta.min_p is None
    assert meta.max_num_logprobs == 0 and meta.banned_token_ids == [[1], []]
    assert make_meta([SamplingParams(temperature=0)]).all_greedy


def test_all_greedy_is_argmax_and_leaves_logits_untouched():
    logits = random_logits(6)
    before = logits.clone()
    out = Sampler()(logits, make_meta([SamplingParams(temperature=0)] * 6))
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))
    assert out.logprobs is None and out.logprob_token_ids is None and out.sampled_token_ranks is None
    assert torch.equal(logits, before)


def test_mixed_greedy_and_sampled_batch():
    logits = random_logits(6, seed=4)
    before = logits.clone()
    params = [SamplingParams(temperature=0), SamplingParams(top_k=1), SamplingParams(top_k=3, temperature=2.0),
              SamplingParams(temperature=0, top_k=3), SamplingParams(min_p=1.0), SamplingParams(top_p=1e-6)]
    for step in range(20):
        out = Sampler()(logits, make_meta(params), generator=seeded(step))
        ids = out.sampled_token_ids.tolist()
        argmax = logits.argmax(-1).tolist()
        # Greedy rows and rows whose filters leave one token are argmax; top-3 stays in the top 3.
        assert [ids[i] for i in (0, 1, 3, 4, 5)] == [argmax[i] for i in (0, 1, 3, 4, 5)]
        assert ids[2] in ref_top_k(logits[2], 3)
    assert torch.equal(logits, before)


def test_banned_ids_are_never_sampled():
    logits = random_logits(1, vocab=8, seed=5).repeat(2000, 1)
    top2 = logits[0].topk(2).indices.tolist()
    params = [SamplingParams(temperature=0)] + [SamplingParams()] * 1999
    out = Sampler()(logits, make_meta(params, banned=[top2] * 2000), generator=seeded(0))
    ids = out.sampled_token_ids
    assert ids[0].item() == logits[0].topk(3).indices[2].item()  # greedy falls to the third
    assert not torch.isin(ids, torch.tensor(top2)).any()
    assert len(set(ids.tolist())) == 6  # and every other token still occurs


def _run_seeded(seed_row: int, batch_params, batch_seeds, steps=6, vocab=1000):
    """Each seeded row's seed for its step-th output token, as the engine derives it; return the tokens of
    seed_row."""
    tokens = []
    for step in range(steps):
        logits = random_logits(len(batch_params), vocab, seed=1000 + step + 17 * len(batch_params))
        logits[seed_row] = random_logits(1, vocab, seed=step)[0]  # the request's own history
        meta = make_meta(batch_params, [None if s is None else position_seed(s, step) for s in batch_seeds])
        out = Sampler()(logits, meta, generator=seeded(step + 99 * len(batch_params)))
        tokens.append(out.sampled_token_ids[seed_row].item())
    return tokens


def test_position_seeds_of_nearby_seeds_and_indices_are_unrelated():
    """No stream is another's shifted: seed s + the SplitMix64 step at index i is not seed s at index i + 1."""
    step = 0x9E3779B97F4A7C15
    seeds = {position_seed(s, i) for s in (0, 1, 2, -1, 12345, step, 2 * step) for i in range(50)}
    assert len(seeds) == 7 * 50 and all(0 <= x < 2**62 for x in seeds)
    assert position_seed(5 + step, 3) != position_seed(5, 4)


def test_seeded_rows_do_not_depend_on_the_batch():
    mine = SamplingParams(seed=42, temperature=1.5, top_p=0.95)
    alone = _run_seeded(0, [mine], [42])
    params = [SamplingParams(seed=7), SamplingParams(), SamplingParams(temperature=0), mine, SamplingParams(seed=9)]
    in_batch = _run_seeded(3, params, [7, None, None, 42, 9])
    assert alone == in_batch
    assert len(set(alone)) > 1  # really random draws, not a degenerate distribution
    other_seed = _run_seeded(0, [SamplingParams(seed=43, temperature=1.5, top_p=0.95)], [43])
    assert other_seed != alone


def _chi_square(ids: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(ids, minlength=probs.numel()).double()
    expected = probs.double() * ids.numel()
    return (((counts - expected) ** 2) / expected).sum().item()


# chi-square with 4 degrees of freedom: P(X > 23.5) ~ 1e-4; the seeds are fixed so this cannot flake.
CHI2_4DOF = 23.5


def test_sampling_frequencies_match_softmax_over_temperature():
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, -2.0]])
    n, t = 20000, 0.7
    out = Sampler()(logits.repeat(n, 1), make_meta([SamplingParams(temperature=t)] * n), generator=seeded(0))
    assert _chi_square(out.sampled_token_ids, torch.softmax(logits[0] / t, -1)) < CHI2_4DOF


def test_seeded_sampling_frequencies_match_filtered_softmax():
    """Every row with its own seed (the per-row path), top-k = 4 renormalising the distribution."""
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, -2.0, -3.0]])
    n = 4000
    meta = make_meta([SamplingParams(temperature=1.3, top_k=4)] * n, seeds=[position_seed(s, 0) for s in range(n)])
    ids = Sampler()(logits.repeat(n, 1), meta).sampled_token_ids
    assert ids.max().item() <= 3
    probs = torch.softmax(logits[0, :4] / 1.3, -1)
    assert _chi_square(ids, probs) < 16.3  # 3 dof, P ~ 1e-3


def test_top_k_top_p_sampling_frequencies_on_the_candidate_path():
    """Qwen3's defaults (top_k 20, top_p 0.95, temperature 0.6) as a server applies them: the draw follows the
    renormalised distribution of the kept set."""
    logits = torch.linspace(2.0, -6.0, V).unsqueeze(0)
    n, t = 20000, 0.6
    meta = make_meta([SamplingParams(temperature=t, top_k=20, top_p=0.95)] * n)
    assert meta.top_k_bounded
    ids = Sampler()(logits.repeat(n, 1), meta, generator=seeded(1)).sampled_token_ids
    keep = sorted(ref_top_p(logits[0] / t, ref_top_k(logits[0], 20), 0.95))
    assert len(keep) == 14 and set(ids.tolist()) <= set(keep)   # top-p cuts 6 of the 20
    probs = torch.softmax(logits[0, keep] / t, -1)
    assert _chi_square(torch.searchsorted(torch.tensor(keep), ids), probs) < 39.9   # 13 dof, P ~ 1e-4


def test_logprobs_are_raw_log_softmax_with_sampled_first_and_ranks():
    logits = random_logits(5, seed=6)
    params = [SamplingParams(temperature=0, logprobs=3), SamplingParams(logprobs=1, temperature=2.0),
              SamplingParams(), SamplingParams(top_k=2, logprobs=0), SamplingParams(temperature=0, logprobs=3)]
    banned = [[], [], [], [], logits[4].topk(2).indices.tolist()]  # row 4: its greedy pick has rank 3
    out = Sampler()(logits, make_meta(params, banned=banned), generator=seeded(0))
    raw = torch.log_softmax(logits, dim=-1)
    sampled = out.sampled_token_ids
    assert out.logprob_token_ids.shape == (5, 4) and out.logprobs.shape == (5, 4)
    assert torch.equal(out.logprob_token_ids[:, 0], sampled)
    assert torch.allclose(out.logprobs[:, 0], raw.gather(1, sampled[:, None])[:, 0])
    top = raw.topk(3, dim=-1)
    assert torch.equal(out.logprob_token_ids[:, 1:], top.indices)
    assert torch.allclose(out.logprobs[:, 1:], top.values)
    order = raw.argsort(dim=-1, descending=True)
    ranks = [order[i].tolist().index(sampled[i].item()) + 1 for i in range(5)]
    assert out.sampled_token_ranks.tolist() == ranks
    assert ranks[0] == 1 and ranks[4] == 3 and ranks[3] in (1, 2)
    # Greedy logprobs are exactly what transformers reports: log_softmax of the logits.
    assert torch.equal(out.logprobs[0, 0], raw[0].max())


def test_logprob_token_ids_replace_the_top_n_of_their_rows_only():
    """Rows naming ids get those ids' raw logprobs in their order (padding to the widest row: the top-N, cut
    by the host); other rows keep their top-N; the sampled token stays first with its rank."""
    logits = random_logits(3, seed=9)
    params = [SamplingParams(temperature=0, logprob_token_ids=[11, 2, 40]), SamplingParams(temperature=0, logprobs=2),
              SamplingParams(temperature=0, logprob_token_ids=[5])]
    meta = make_meta(params)
    assert meta.max_num_logprobs == 3 and meta.logprob_token_ids.tolist() == [[11, 2, 40], [-1, -1, -1], [5, -1, -1]]
    out = Sampler()(logits, meta, generator=seeded(0))
    raw = torch.log_softmax(logits, dim=-1)
    sampled = out.sampled_token_ids
    assert torch.equal(out.logprob_token_ids[:, 0], sampled) and out.sampled_token_ranks.tolist() == [1, 1, 1]
    assert out.logprob_token_ids[0, 1:].tolist() == [11, 2, 40] and out.logprob_token_ids[2, 1].item() == 5
    assert torch.equal(out.logprob_token_ids[1, 1:], raw[1].topk(3).indices)
    assert torch.equal(out.logprobs, raw.gather(1, out.logprob_token_ids))
    assert make_meta([SamplingParams(logprobs=2)]).logprob_token_ids is None


def test_top_k_beyond_vocab_and_tiny_vocab():
    logits = random_logits(3, vocab=2, seed=7)
    params = [SamplingParams(top_k=5), SamplingParams(top_k=5, top_p=0.5), SamplingParams(min_p=0.5, logprobs=2)]
    out = Sampler()(logits, make_meta(params), generator=seeded(0))
    assert out.sampled_token_ids.shape == (3,) and out.logprobs.shape == (3, 3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_logits_filter_and_sample_as_their_float32_copy(dtype):
    """The temperature's division promotes 16-bit logits to float32 itself: the same masks, the same draws."""
    logits = random_logits(4, seed=9).to(dtype)
    params = [SamplingParams(temperature=0.6, top_k=20, top_p=0.95, seed=1), SamplingParams(top_p=0.5, seed=2),
              SamplingParams(temperature=0.8, min_p=0.1, seed=3), SamplingParams(temperature=1.3, seed=4)]
    draws = [Sampler()(x, make_meta(params, [position_seed(i, 0) for i in range(4)])).sampled_token_ids
             for x in (logits, logits.float())]
    assert torch.equal(*draws)
    scaled = apply_temperature(logits, torch.full((4,), 0.6))
    assert scaled.dtype == torch.float32 and torch.equal(scaled, logits.float() / 0.6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_are_upcast(dtype):
    logits = random_logits(2, seed=8).to(dtype)
    out = Sampler()(logits, make_meta([SamplingParams(temperature=0, logprobs=1), SamplingParams(logprobs=1)]))
    assert out.logprobs.dtype == torch.float32 and out.sampled_token_ids.dtype == torch.int64
    assert out.sampled_token_ids[0].item() == logits[0].float().argmax().item()
