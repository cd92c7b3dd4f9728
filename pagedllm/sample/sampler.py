"""Turns the last-position logits of a batch into next tokens (vLLM v1's order and semantics).

    logits (N, V) ─┬─ log_softmax ─────────────────────────────────────────► raw logprobs (if asked)
                   └─ processors ─┬─ argmax ─────────────────────────────► greedy rows
                                  └─ / temperature → min_p → top-k → top-p
                                     → softmax → argmax(probs / q), q ~ Exp(1) ──► other rows

processors (logits_processors.py, vLLM v1's order): allowed_token_ids, bad_words, the min_tokens bans,
logit_bias, penalties; skipped when no row uses any.

Everything is batched tensor work. A seeded row's randomness comes from its own seed and the index of the
token it samples (position_seed), so its tokens depend on nothing else: not its batch neighbours, not
preemption, not speculation (the rejection sampler draws each position as this sampler would). On CUDA the
random draw is one fused Gumbel-max kernel (gumbel_kernel.py) instead of the softmax and exponential race.
"""
from dataclasses import dataclass

import torch
from torch import nn

from pagedllm.lazy_kernel import lazy_kernel
from pagedllm.sample.host_copy import to_device
from pagedllm.sample.logits_processors import LogitsProcessors, apply_logits_processors
from pagedllm.sampling_params import _GREEDY_EPS, SamplingParams

draw_seeds = lazy_kernel(globals(), "pagedllm.sample.gumbel_kernel", "draw_seeds")         # Triton, CUDA only
gumbel_sample = lazy_kernel(globals(), "pagedllm.sample.gumbel_kernel", "gumbel_sample")


@dataclass
class SamplingMetadata:
    temperature: torch.Tensor                 # (N,) float32; rows below _GREEDY_EPS are greedy
    top_k: torch.Tensor | None                # (N,) int64, 0 = off; None when no row uses top-k
    max_top_k: int | None                     # the largest k asked for, known on the host: no device sync
    top_k_bounded: bool                       # every sampled row has a k: top-p can work on max_top_k candidates
    top_p: torch.Tensor | None                # (N,) float32, 1.0 = off; None when unused
    min_p: torch.Tensor | None                # (N,) float32, 0 = off; None when unused
    seeds: dict[int, int]                     # row -> the seed of the token it samples (seeded, non-greedy rows)
    all_greedy: bool
    any_greedy: bool
    all_temperature_one: bool                 # no row needs the division by temperature
    max_num_logprobs: int | None              # None: no row asked for logprobs
    logprob_token_ids: torch.Tensor | None    # (N, max_num_logprobs) int64: rows' own ids, -1 = top-N; None: unused
    banned_token_ids: list[list[int]] | None  # per row: ids masked to -inf (EOS/stop ids before min_tokens)
    processors: LogitsProcessors | None = None   # None: no row uses allowed ids, bad words, bias, penalties

    @classmethod
    def build(cls, params: list[SamplingParams], seeds: list[int | None],
              banned_token_ids: list[list[int]], device,
              processors: LogitsProcessors | None = None) -> "SamplingMetadata":
        # Greedy rows ignore top-k/p and min-p, so they neither switch the filters on nor draw randomness.
        sampled = [not p.greedy for p in params]
        top_k = [p.top_k if s else 0 for p, s in zip(params, sampled)]
        top_p = [p.top_p if s else 1.0 for p, s in zip(params, sampled)]
        min_p = [p.min_p if s else 0.0 for p, s in zip(params, sampled)]
        num_logprobs = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            temperature=to_device([p.temperature for p in params], torch.float32, device),
            top_k=_tensor_if(any(k > 0 for k in top_k), top_k, torch.int64, device),
            max_top_k=max(top_k) if any(k > 0 for k in top_k) else None,
            top_k_bounded=all(k > 0 for k, s in zip(top_k, sampled) if s),
            top_p=_tensor_if(any(p < 1.0 for p in top_p), top_p, torch.float32, device),
            min_p=_tensor_if(any(m > 0.0 for m in min_p), min_p, torch.float32, device),
            seeds={i: seed for i, (seed, s) in enumerate(zip(seeds, sampled)) if seed is not None and s},
            all_greedy=not any(sampled),
            any_greedy=not all(sampled),
            all_temperature_one=all(p.temperature == 1.0 for p in params),
            max_num_logprobs=max(num_logprobs) if num_logprobs else None,
            logprob_token_ids=chosen_logprob_ids(params, max(num_logprobs) if num_logprobs else 0, device),
            banned_token_ids=banned_token_ids if any(banned_token_ids) else None,
            processors=processors,
        )


_MASK64 = (1 << 64) - 1


def position_seed(seed: int, index: int) -> int:
    """The seed of a seeded request's output token `index`, in [0, 2**62) (the Gumbel kernel's range): SplitMix64
    steps from the seed's own mix, so neighbouring seeds and indices give unrelated streams (stepping from the seed
    itself, seeds one step constant apart would give one stream shifted by an index)."""
    return _mix64(_mix64(seed) + (index + 1) * 0x9E3779B97F4A7C15) >> 2


def _mix64(z: int) -> int:
    """SplitMix64's finaliser of z modulo 2**64."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def chosen_logprob_ids(params: list[SamplingParams], width: int, device) -> torch.Tensor | None:
    """(N, width) int64: each row's logprob_token_ids, -1 for the top-N (padding, rows without); None: no row
    names ids."""
    if not any(p.logprob_token_ids for p in params):
        return None
    ids = [(p.logprob_token_ids or []) + [-1] * (width - len(p.logprob_token_ids or [])) for p in params]
    return to_device(ids, torch.int64, device)


def _tensor_if(used: bool, values: list, dtype: torch.dtype, device) -> torch.Tensor | None:
    return to_device(values, dtype, device) if used else None


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor           # (N,) int64
    logprob_token_ids: torch.Tensor | None    # (N, 1 + K) int64: column 0 = sampled token, then the top-K ids
    logprobs: torch.Tensor | None             # (N, 1 + K) float32, matching logprob_token_ids
    sampled_token_ranks: torch.Tensor | None  # (N,) int64: rank of the sampled token, 1 = most likely


class Sampler(nn.Module):
    def forward(self, logits: torch.Tensor, meta: SamplingMetadata,
                generator: torch.Generator | None = None) -> SamplerOutput:
        """generator: the engine's global generator for unseeded rows (None = torch's default). Logits stay
        in the model's dtype where that changes nothing (argmax, the fused CUDA draw); float32 elsewhere."""
        # Raw logprobs: the model's distribution, before bans and temperature (vLLM's default).
        raw_logprobs = logits.float().log_softmax(dim=-1) if meta.max_num_logprobs is not None else None
        if meta.banned_token_ids is not None or meta.processors is not None:
            logits = apply_logits_processors(logits, meta.processors, meta.banned_token_ids)
        if meta.all_greedy:
            sampled = logits.argmax(dim=-1)
        elif not meta.any_greedy:
            sampled = self.sample(logits, meta, generator)
        else:
            greedy = logits.argmax(dim=-1)
            sampled = torch.where(meta.temperature < _GREEDY_EPS, greedy, self.sample(logits, meta, generator))
        if raw_logprobs is None:
            return SamplerOutput(sampled, None, None, None)
        return SamplerOutput(sampled, *gather_logprobs(raw_logprobs, sampled, meta.max_num_logprobs,
                                                       meta.logprob_token_ids))

    @staticmethod
    def sample(logits: torch.Tensor, meta: SamplingMetadata, generator: torch.Generator | None) -> torch.Tensor:
        """Random draw for every row (greedy rows get a throwaway value that the caller discards)."""
        filtered = meta.min_p is not None or meta.top_k is not None or meta.top_p is not None
        if logits.is_cuda and not filtered:   # plain sampling at any temperature: one pass over the logits
            seeds = draw_seeds(logits.shape[0], meta.seeds, generator, logits.device)
            return gumbel_sample(logits, seeds, None if meta.all_temperature_one else meta.temperature)
        if not filtered and meta.all_temperature_one:   # plain sampling
            return exponential_race(logits.float().softmax(dim=-1), meta.seeds, generator)
        # A new float32 tensor (16-bit logits promote in the division: one pass, not a copy and then a division),
        # which the masks below change in place.
        logits = apply_temperature(logits, meta.temperature)
        if meta.min_p is not None:
            logits = apply_min_p(logits, meta.min_p)
        logits = apply_top_k_top_p(logits, meta.top_k, meta.top_p, meta.max_top_k, meta.top_k_bounded)
        if logits.is_cuda:
            return gumbel_sample(logits, draw_seeds(logits.shape[0], meta.seeds, generator, logits.device))
        return exponential_race(logits.softmax(dim=-1), meta.seeds, generator)


_CANDIDATES_MAX_K = 1024   # top-p (within top-k) from this many candidates at most; a sort beyond. H200, 300 x
#                            151,936 logits: 1.8 ms at k = 20 against the sort's 7.2 (larger k not measured)


# Top-p alone from the candidates costs a topk and a read of one bool from the device (the host then waits for the
# step's forward: its next-step work no longer overlaps it); when the candidates miss p (flat rows: dummy weights),
# that is all lost to the sort after them. So after a miss this many calls sort at once, then the candidates are
# tried again. The choice changes no result: both paths keep the same tokens.
_TOP_P_SORTS_AFTER_A_MISS = 64
_top_p_sorts_left = 0


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    # Greedy rows (temperature ~ 0) divide by 1 instead of 0; their draw is discarded anyway.
    temperature = torch.where(temperature < _GREEDY_EPS, 1.0, temperature)
    return logits / temperature.unsqueeze(1)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """In place: drop tokens with p < min_p * p_max over the full distribution (min_p = 0 masks nothing).
    On float32 probabilities, as vLLM compares them: the log-space test logit < max_logit + log(min_p), equal in
    exact arithmetic, decides tokens within a rounding of the threshold the other way."""
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True).mul_(min_p.unsqueeze(1))
    return logits.masked_fill_(probs < threshold, -float("inf"))


def apply_top_k_top_p(logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None,
                      max_k: int | None, bounded: bool = False) -> torch.Tensor:
    """Keep each row's k most likely tokens (k <= 0: all), then the smallest set of those whose cumulative
    probability reaches p (the top token always stays). Ties with the k-th value are kept. In place unless it
    takes the sort (a new tensor): use what it returns. max_k: max(k), from the host (reading it
    from k would wait for the device). bounded: every row that counts has a k (rows with k <= 0 get max_k:
    greedy rows, whose draws are discarded)."""
    if p is None:
        return logits if k is None else apply_top_k_only(logits, k, max_k)
    if k is not None and bounded and max_k <= _CANDIDATES_MAX_K and max_k < logits.shape[-1]:
        return _top_p_of_candidates(logits, k, p, max_k)
    if k is None and 0 < _CANDIDATES_MAX_K < logits.shape[-1]:
        global _top_p_sorts_left
        if _top_p_sorts_left > 0:
            _top_p_sorts_left -= 1
        else:
            masked = _top_p_of_candidates(logits, None, p, _CANDIDATES_MAX_K)
            if masked is not None:
                return masked
            _top_p_sorts_left = _TOP_P_SORTS_AFTER_A_MISS
    # Ascending sort: top-p drops the longest low-probability prefix whose mass is <= 1 - p.
    #   sorted:  [ low ........................................ high ]
    #   cumsum:  [ <= 1-p: dropped        |  kept: mass >= p         ]
    logits_sort, logits_idx = logits.sort(dim=-1, descending=False)
    vocab_size = logits.shape[-1]
    if k is not None:
        k = torch.where((k <= 0) | (k > vocab_size), vocab_size, k)
        kth_value = logits_sort.gather(1, (vocab_size - k).unsqueeze(1))
        logits_sort.masked_fill_(logits_sort < kth_value, -float("inf"))
    cumprobs = logits_sort.softmax(dim=-1).cumsum_(dim=-1)
    drop = cumprobs <= 1 - p.unsqueeze(1)
    drop[:, -1] = False
    logits_sort.masked_fill_(drop, -float("inf"))
    return logits_sort.scatter(dim=-1, index=logits_idx, src=logits_sort)


def _top_p_of_candidates(logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor, num: int
                         ) -> torch.Tensor | None:
    """In place. Top-k, then top-p, from each row's `num` best values instead of a sort of the vocabulary (Qwen3's
    defaults, top_k 20 and top_p 0.95, took a full sort of 300 x 151,936 logits a step). What stays is every token
    at or above a threshold found among the candidates; tokens tied with it beyond them stay too.
    k: every sampled row's k <= num (k <= 0: num, greedy rows, whose draws are discarded); the tokens tied with
    the k-th value beyond the candidates add to top-p's total. None: top-p alone (Llama 3's default, top_p 0.9),
    against the whole row's mass, which the candidates must reach in every row (or its p is 1: nothing dropped);
    when they do not (flat rows: dummy weights), None and the logits untouched. Knowing that waits for the device
    (see _TOP_P_SORTS_AFTER_A_MISS)."""
    vals = logits.topk(num, dim=-1).values                                # (N, num), descending
    top = vals[:, :1]
    w = torch.exp(vals - top)                                             # unnormalised probabilities
    p = p.unsqueeze(1)
    everything = None
    if k is not None:
        kth = vals.gather(1, (torch.where(k > 0, k, num) - 1).unsqueeze(1))
        in_k = vals >= kth
        w = w * in_k
        beyond = (logits >= kth).sum(dim=-1, keepdim=True) - in_k.sum(dim=-1, keepdim=True)
        total = w.sum(dim=-1, keepdim=True) + beyond * torch.exp(kth - top)
    else:
        total = torch.exp(torch.logsumexp(logits, dim=-1, keepdim=True) - top)
    cum = w.cumsum(dim=-1)
    if k is None:
        everything = p >= 1
        if not ((cum[:, -1:] / total >= p) | everything).all():            # waits for the device: one bool
            return None
    keep = (cum - w) / total < p                                          # the better candidates' mass < p
    if k is not None:
        keep &= in_k
    threshold = torch.where(keep, vals, float("inf")).amin(dim=-1, keepdim=True)
    if everything is not None:
        threshold.masked_fill_(everything, -float("inf"))
    return logits.masked_fill_(logits < threshold, -float("inf"))


def apply_top_k_only(logits: torch.Tensor, k: torch.Tensor, max_k: int) -> torch.Tensor:
    """In place. topk(max k) instead of a full sort: much cheaper when k is small against V."""
    vocab_size = logits.shape[-1]
    off = (k <= 0) | (k >= vocab_size)
    k = k.masked_fill(off, 1)
    kth_value = logits.topk(min(max(max_k, 1), vocab_size), dim=-1).values.gather(1, (k - 1).unsqueeze(1))
    kth_value.masked_fill_(off.unsqueeze(1), -float("inf"))
    return logits.masked_fill_(logits < kth_value, -float("inf"))


def exponential_race(probs: torch.Tensor, row_seeds: dict[int, int],
                     generator: torch.Generator | None) -> torch.Tensor:
    """argmax(p_i / q_i) with q_i ~ Exp(1) picks i with probability p_i (Gumbel-max without the logs)
    and needs no host sync, unlike torch.multinomial. Seeded rows draw q from a generator of their seed, so
    their samples depend on nothing but that seed."""
    q = torch.empty_like(probs).exponential_(generator=generator)
    for row, seed in row_seeds.items():
        q[row].exponential_(generator=torch.Generator(probs.device).manual_seed(seed))
    # q = 0 would turn masked tokens' 0 / 0 into NaN, which argmax would pick.
    q.clamp_min_(torch.finfo(q.dtype).tiny)
    return probs.div_(q).argmax(dim=-1)


def gather_logprobs(logprobs: torch.Tensor, sampled: torch.Tensor, num_logprobs: int,
                    chosen: torch.Tensor | None = None):
    """-> (token ids (N, 1+K), logprobs (N, 1+K), ranks (N,)); column 0 is the sampled token.
    Rank = how many tokens are at least as likely as the sampled one (vLLM's convention: 1 = top).
    chosen (N, K): ids that replace the top-K where >= 0 (logprob_token_ids)."""
    sampled = sampled.unsqueeze(1)
    sampled_logprobs = logprobs.gather(1, sampled)
    ranks = (logprobs >= sampled_logprobs).sum(dim=-1)
    top_logprobs, top_ids = logprobs.topk(num_logprobs, dim=-1)
    if chosen is not None:
        top_ids = torch.where(chosen >= 0, chosen, top_ids)
        top_logprobs = logprobs.gather(1, top_ids)
    token_ids = torch.cat((sampled, top_ids), dim=1)
    return token_ids, torch.cat((sampled_logprobs, top_logprobs), dim=1), ranks
