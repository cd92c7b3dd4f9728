"""pagedllm's whole sampling pipeline against a re-statement of vLLM 0.26's v1 sampler, float32, exact.

The reference below is written from reading vLLM's sampler (v1/sample/sampler.py, ops/penalties.py,
ops/bad_words.py, ops/topk_topp_sampler.py's sort-based path, logits_processor/builtin.py), batched as vLLM
batches it, in its order:

    raw logprobs ← logits
    float32 → allowed ids → bad words → min_tokens bans → logit bias → penalties (repetition, frequency, presence)
    → greedy rows: argmax
    → others: / temperature → min_p (softmax, p < min_p * p_max) → top-k, top-p (ascending sort, cumsum) → softmax

The repetition penalty divides positive logits, as vLLM's CUDA kernel does (its CPU fallback multiplies by the
reciprocal). Rows are compared on what decides a draw: the greedy token, or the whole probability vector
(torch.equal), plus the raw logprobs, the top-N and the sampled token's rank. Logits are random float32 draws,
so no two tokens tie at a top-p boundary (there vLLM's sort keeps part of a tie group, pagedllm all of it).
"""
import random

import pytest
import torch

import pagedllm.sample.sampler as sampler_module
from pagedllm.sample.logits_processors import build_logits_processors
from pagedllm.sample.penalties import Penalties, PenaltyTable
from pagedllm.sample.sampler import Sampler, SamplingMetadata
from pagedllm.sampling_params import SamplingParams

EPS = 1e-5           # vLLM's _SAMPLING_EPS: below it a row is greedy
NEG_INF = -float("inf")


# ---- the reference ------------------------------------------------------------------------------------------

def vllm_temperature(r) -> float:
    """vLLM's SamplingParams raises a temperature in (0, 0.01) to 0.01: only 0 is greedy."""
    return max(r["temp"], 0.01) if r["temp"] > 0 else r["temp"]


def is_greedy(r) -> bool:
    return vllm_temperature(r) < EPS


def ref_processors(logits, reqs):
    x = logits.float().clone()
    n, vocab = x.shape
    for i, r in enumerate(reqs):                                   # allowed_token_ids: a mask of the others
        if r["allowed"]:
            banned = torch.ones(vocab, dtype=torch.bool)
            banned[r["allowed"]] = False
            x[i].masked_fill_(banned, NEG_INF)
    for i, r in enumerate(reqs):                                   # bad words, on the output tokens only
        out = r["output"]
        for word in r["bad_words"]:
            if len(word) > len(out) + 1:
                continue
            if len(word) == 1 or out[len(out) - len(word) + 1:] == word[:-1]:
                x[i, word[-1]] = NEG_INF
    for i, r in enumerate(reqs):                                   # min_tokens: stop ids banned
        if len(r["output"]) < r["min_tokens"]:
            x[i, sorted(r["stop_ids"])] = NEG_INF
    for i, r in enumerate(reqs):                                   # logit bias
        for t, b in (r["bias"] or {}).items():
            x[i, t] += torch.tensor(b, dtype=torch.float32)
    if any(r["rep"] != 1.0 or r["freq"] or r["pres"] for r in reqs):
        counts = torch.zeros(n, vocab, dtype=torch.int64)
        in_prompt = torch.zeros(n, vocab, dtype=torch.bool)
        for i, r in enumerate(reqs):
            for t in r["output"]:
                counts[i, t] += 1
            in_prompt[i, r["prompt"]] = True
        seen = (counts > 0) | in_prompt
        rep = torch.tensor([r["rep"] for r in reqs], dtype=torch.float32).unsqueeze(1).expand(n, vocab)
        rep = torch.where(seen, rep, 1.0)
        x = torch.where(x > 0, x / rep, x * rep)
        x -= torch.tensor([r["freq"] for r in reqs], dtype=torch.float32).unsqueeze(1) * counts
        x -= torch.tensor([r["pres"] for r in reqs], dtype=torch.float32).unsqueeze(1) * (counts > 0)
    return x


def ref_filters(x, reqs):
    """The sampled rows' logits after temperature, min_p, top-k and top-p (greedy rows' are meaningless)."""
    n, vocab = x.shape
    temp = torch.tensor([vllm_temperature(r) for r in reqs], dtype=torch.float32)
    x = x / torch.where(temp < EPS, 1.0, temp).unsqueeze(1)
    min_p = torch.tensor([r["min_p"] if not is_greedy(r) else 0.0 for r in reqs], dtype=torch.float32)
    if (min_p > 0).any():
        probs = torch.softmax(x, dim=-1)
        x = x.masked_fill(probs < probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1), NEG_INF)
    k = [r["top_k"] if not is_greedy(r) and 0 < r["top_k"] < vocab else vocab for r in reqs]
    p = [r["top_p"] if not is_greedy(r) else 1.0 for r in reqs]
    if all(v == vocab for v in k) and all(v == 1.0 for v in p):
        return x
    asc, order = x.sort(dim=-1)
    kth = asc.gather(1, (vocab - torch.tensor(k)).unsqueeze(1))
    asc = asc.masked_fill(asc < kth, NEG_INF)
    cum = asc.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= 1 - torch.tensor(p, dtype=torch.float32).unsqueeze(1)
    drop[:, -1] = False
    asc = asc.masked_fill(drop, NEG_INF)
    return x.scatter(1, order, asc)


# ---- pagedllm, through its own functions -------------------------------------------------------------------

def pagedllm_params(r) -> SamplingParams:
    p = SamplingParams(temperature=r["temp"], top_k=r["top_k"], top_p=r["top_p"], min_p=r["min_p"],
                       presence_penalty=r["pres"], frequency_penalty=r["freq"], repetition_penalty=r["rep"],
                       logit_bias=r["bias"], allowed_token_ids=r["allowed"], min_tokens=r["min_tokens"],
                       logprobs=r["logprobs"])
    p.bad_words_token_ids = r["bad_words"]
    p.min_tokens_banned_ids = set(r["stop_ids"])
    return p


def run_pagedllm(logits, reqs, monkeypatch):
    """(sampled ids, the probabilities the draw used (None: no row drew), SamplerOutput)."""
    params = [pagedllm_params(r) for r in reqs]
    vocab = logits.shape[1]
    table = PenaltyTable(vocab, "cpu")
    slots = [table.slot(f"r{i}", r["prompt"], len(r["prompt"])) if p.uses_penalties else None
             for i, (r, p) in enumerate(zip(reqs, params))]
    for i, s in enumerate(slots):
        for t in reqs[i]["output"] if s is not None else ():
            table.record(torch.tensor([s]), torch.tensor([t]))
    penalties = Penalties.build(table, params, slots, "cpu")
    procs = build_logits_processors(params, penalties, [(r["output"], None) for r in reqs], None, "cpu")
    banned = [sorted(r["stop_ids"]) if len(r["output"]) < r["min_tokens"] else [] for r in reqs]
    meta = SamplingMetadata.build(params, [None] * len(reqs), banned, "cpu", procs)
    seen = {}

    def race(probs, row_seeds, generator):
        seen["probs"] = probs.clone()
        return probs.argmax(dim=-1)

    monkeypatch.setattr(sampler_module, "exponential_race", race)
    out = Sampler()(logits, meta)
    return out.sampled_token_ids, seen.get("probs"), out


# ---- random requests ----------------------------------------------------------------------------------------

TEMPS = [0.0, 1e-6, 0.005, 0.3, 0.7, 1.0, 1.0, 1.5, 2.0]
TOP_KS = [0, 0, -1, 1, 2, 5, 20, 50]
TOP_PS = [1.0, 1.0, 0.95, 0.9, 0.5, 0.1, 1e-3]
MIN_PS = [0.0, 0.0, 0.0, 0.05, 0.2, 0.5, 1.0]


def random_request(rng: random.Random, vocab: int, features: float) -> dict:
    """features: the chance of each optional feature."""
    def maybe(value, default):
        return value if rng.random() < features else default

    output = [rng.randrange(vocab) for _ in range(rng.randrange(0, 12))]
    prompt = [rng.randrange(vocab) for _ in range(rng.randrange(1, 20))]
    words = [[rng.randrange(vocab)] for _ in range(rng.randrange(1, 3))]
    if output:   # a two-token word that matches the output's end, and one that does not
        words += [[output[-1], rng.randrange(vocab)], [rng.randrange(vocab), rng.randrange(vocab)]]
    return dict(
        temp=rng.choice(TEMPS), top_k=maybe(rng.choice(TOP_KS + [vocab, vocab + 7]), 0),
        top_p=maybe(rng.choice(TOP_PS), 1.0), min_p=maybe(rng.choice(MIN_PS), 0.0),
        rep=maybe(rng.choice([0.5, 0.9, 1.2, 2.0]), 1.0), freq=maybe(rng.uniform(-2, 2), 0.0),
        pres=maybe(rng.uniform(-2, 2), 0.0),
        bias=maybe({rng.randrange(vocab): rng.uniform(-100, 100) for _ in range(rng.randrange(1, 6))}, None),
        allowed=maybe(rng.sample(range(vocab), rng.randrange(1, max(2, vocab // 4))), None),
        bad_words=maybe(words, []), min_tokens=maybe(rng.randrange(0, 15), 0),
        stop_ids=rng.sample(range(vocab), 2), prompt=prompt, output=output,
        logprobs=maybe(rng.choice([0, 1, 5]), None))


def compare(logits, reqs, monkeypatch):
    sampled, probs, out = run_pagedllm(logits, reqs, monkeypatch)
    x = ref_processors(logits, reqs)
    greedy = [is_greedy(r) for r in reqs]
    ref_greedy = x.argmax(dim=-1)
    ref_probs = torch.softmax(ref_filters(x, reqs), dim=-1)
    for i, r in enumerate(reqs):
        if greedy[i]:
            assert sampled[i].item() == ref_greedy[i].item(), (i, r)
        else:
            assert probs is not None and torch.equal(probs[i], ref_probs[i]), (i, r)
    if any(r["logprobs"] is not None for r in reqs):
        raw = logits.float().log_softmax(dim=-1)
        n = max(r["logprobs"] for r in reqs if r["logprobs"] is not None)
        top_lp, top_ids = raw.topk(n, dim=-1)
        chosen = raw.gather(1, sampled.unsqueeze(1))
        assert torch.equal(out.logprobs, torch.cat([chosen, top_lp], dim=1))
        assert torch.equal(out.logprob_token_ids, torch.cat([sampled.unsqueeze(1), top_ids], dim=1))
        assert torch.equal(out.sampled_token_ranks, (raw >= chosen).sum(dim=-1))


@pytest.mark.parametrize("vocab", [64, 2048])     # 2048: past _CANDIDATES_MAX_K, the candidates' paths
@pytest.mark.parametrize("features", [0.2, 0.6])
def test_pipeline_matches_vllm_reference(vocab, features, monkeypatch):
    rng = random.Random(vocab * 10 + int(features * 10))
    for trial in range(25):
        n = rng.randrange(1, 9)
        logits = torch.randn(n, vocab, generator=torch.Generator().manual_seed(trial)) * rng.choice([1.0, 3.0, 8.0])
        compare(logits, [random_request(rng, vocab, features) for _ in range(n)], monkeypatch)


def test_each_filter_alone_matches_vllm_reference(monkeypatch):
    """One feature a row, every listed value, in one batch (the rest at their defaults)."""
    vocab = 2048
    base = random_request(random.Random(0), vocab, 0.0)
    base.update(temp=0.8)
    reqs = ([dict(base, temp=t) for t in TEMPS] + [dict(base, top_k=k) for k in TOP_KS + [vocab, vocab + 1]]
            + [dict(base, top_p=p) for p in TOP_PS] + [dict(base, min_p=m) for m in MIN_PS]
            + [dict(base, top_k=20, top_p=0.95), dict(base, top_k=5, top_p=0.3, min_p=0.1)])
    logits = torch.randn(len(reqs), vocab, generator=torch.Generator().manual_seed(1)) * 4
    compare(logits, reqs, monkeypatch)


def test_greedy_ties_take_the_lowest_id(monkeypatch):
    """torch's argmax, as vLLM's greedy_sample: the first of equal maxima; also after a bias makes the tie."""
    logits = torch.zeros(2, 64)
    logits[0, [9, 3, 40]] = 5.0
    logits[1, 7] = 4.0
    base = random_request(random.Random(0), 64, 0.0)
    reqs = [dict(base, temp=0.0), dict(base, temp=0.0, bias={2: 4.0})]
    sampled, _, _ = run_pagedllm(logits, reqs, monkeypatch)
    assert sampled.tolist() == [3, 2]
    compare(logits, reqs, monkeypatch)


def test_rows_left_with_no_token_give_token_0_as_vllm():
    """allowed_token_ids all banned as bad words: every logit -inf. vLLM's argmax gives 0; its draw divides NaN
    probabilities, and argmax takes the first NaN: 0 too. pagedllm's CPU draw does the same."""
    base = random_request(random.Random(0), 64, 0.0)
    reqs = [dict(base, temp=t, allowed=[5, 6], bad_words=[[5], [6]]) for t in (0.0, 1.0)]
    params = [pagedllm_params(r) for r in reqs]
    procs = build_logits_processors(params, None, [([], None)] * 2, None, "cpu")
    meta = SamplingMetadata.build(params, [None, 7], [[], []], "cpu", procs)
    out = Sampler()(torch.randn(2, 64) + 3, meta)
    assert out.sampled_token_ids.tolist() == [0, 0]


def test_min_p_at_its_threshold_decides_as_vllm(monkeypatch):
    """Tokens within float32 rounding of min_p * p_max: vLLM compares softmax probabilities (p < min_p * p_max),
    and a log-space test (logit < max + log(min_p)) decides some of them the other way."""
    gen = torch.Generator().manual_seed(0)
    vocab, n = 256, 24
    min_ps = [0.05, 0.1, 0.2, 0.7] * (n // 4)
    logits = torch.randn(n, vocab, generator=gen) * 2
    logits[:, 0] = logits.amax(dim=1) + 0.01
    top = logits[:, :1]
    threshold = top + torch.log(torch.tensor(min_ps)).unsqueeze(1)
    ulps = torch.randint(-4, 5, (n, 40), generator=gen).float() * 1e-7 * threshold.abs().clamp_min(1)
    logits[:, 1:41] = threshold + ulps
    base = random_request(random.Random(0), vocab, 0.0)
    compare(logits, [dict(base, temp=1.0, min_p=m) for m in min_ps], monkeypatch)
