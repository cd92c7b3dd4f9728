"""The per-request logits processors before sampling, in vLLM v1's order:

    allowed_token_ids → bad_words → min_tokens bans → logit_bias → penalties → thinking budget → (sampler)

Each is batched over only the rows that use it (a field is None when no row does), from flat index lists
built once per batch; nothing loops over the vocabulary on the host. Raw logprobs are taken before all of it.

Bad words (vLLM's rule, on the output tokens): a one-token word is always banned; a longer word bans its last
token when the output ends with the rest. The output's last token may still be in flight (sampled by the
step before, only on the device): its place in the tails is filled on the device from those sampled ids.

Thinking budget (vLLM's thinking_token_budget): a row whose open reasoning block holds its budget of tokens may
sample only its reasoning_end_token_id. The runner picks those rows from the tokens on the host; where a row's
last token is still in flight, the device settles it by that token (it may end the block, or open one).
"""
from dataclasses import dataclass

import torch

from pagedllm.sample.host_copy import to_device
from pagedllm.sample.penalties import Penalties, apply_penalties
from pagedllm.sampling_params import SamplingParams

_NO_TOKEN = -1       # left padding of a word's prefix: matches anything
_NO_OUTPUT = -2      # left padding of an output tail shorter than the prefix: matches no token


@dataclass
class BadWordPrefixes:
    """Multi-token bad words of a step: word w bans last[w] in row rows[w] when tails[tail[w]] ends
    with prefix[w]. Built every step (the tails move), so metadata holding it is never reused."""
    rows: torch.Tensor        # (W,) int64
    prefix: torch.Tensor      # (W, L) int64, right-aligned, _NO_TOKEN on the left
    last: torch.Tensor        # (W,) int64
    tail: torch.Tensor        # (W,) int64 index into tails
    tails: torch.Tensor       # (B, L) int64: the last L output tokens of each bad-words row, _NO_OUTPUT padded


@dataclass
class LogitsProcessors:
    allowed: tuple[torch.Tensor, torch.Tensor] | None   # rows (A,) that use it; (2, K) index into rows, id
    banned: torch.Tensor | None           # (2, K) row, id: single-token bad words
    bad_word_prefixes: BadWordPrefixes | None
    logit_bias: tuple[torch.Tensor, torch.Tensor] | None            # (2, K) row, id; (K,) bias
    penalties: Penalties | None
    forced: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None   # rows (F,), token (F,), spared (F,)

    @property
    def reusable(self) -> bool:
        return self.bad_word_prefixes is None


def uses_processors(p: SamplingParams) -> bool:
    return (bool(p.allowed_token_ids or p.bad_words_token_ids or p.logit_bias) or p.uses_penalties
            or p.thinking_token_budget is not None)


def build_logits_processors(params: list[SamplingParams], penalties: Penalties | None,
                            recent: list[tuple[list[int], int | None] | None], in_flight_ids: torch.Tensor | None,
                            device, forced: list[tuple[int, int | None, bool]] = ()) -> LogitsProcessors:
    """recent[i]: (row i's known output tokens, its in-flight token's index in in_flight_ids or None), for
    rows with multi-token bad words (None elsewhere). forced: the rows whose thinking budget may be spent
    (_forced)."""
    allowed_rows = [i for i, p in enumerate(params) if p.allowed_token_ids]
    allowed = [(k, t) for k, i in enumerate(allowed_rows) for t in params[i].allowed_token_ids]
    single = [(i, w[0]) for i, p in enumerate(params) for w in p.bad_words_token_ids if len(w) == 1]
    bias = [(i, t, b) for i, p in enumerate(params) for t, b in (p.logit_bias or {}).items()]
    return LogitsProcessors(
        allowed=(to_device(allowed_rows, torch.int64, device),
                 to_device(list(zip(*allowed)), torch.int64, device)) if allowed else None,
        banned=to_device(list(zip(*single)), torch.int64, device) if single else None,
        bad_word_prefixes=_bad_word_prefixes(params, recent, in_flight_ids, device),
        logit_bias=(to_device([[i for i, _, _ in bias], [t for _, t, _ in bias]], torch.int64, device),
                    to_device([b for _, _, b in bias], torch.float32, device)) if bias else None,
        penalties=penalties, forced=_forced(params, forced, in_flight_ids, device) if forced else None)


def _forced(params, forced: list[tuple[int, int | None, bool]], in_flight_ids, device):
    """forced: (row, its in-flight token's index or None, whether the host's tokens spend the budget). A row
    with a token in flight is forced when that token opens a block and the budget is 0, or when it neither
    opens nor ends one and the host's tokens spend the budget; else spared."""
    rows = [i for i, _, _ in forced]
    tokens = to_device([params[i].reasoning_end_token_id for i in rows], torch.int64, device)
    spared = to_device([not on_host for _, _, on_host in forced], torch.bool, device)
    waiting = [k for k, (_, j, _) in enumerate(forced) if j is not None]
    if waiting:
        k = to_device(waiting, torch.int64, device)
        token = in_flight_ids.index_select(0, to_device([forced[w][1] for w in waiting], torch.int64, device))
        start = [params[rows[w]].reasoning_start_token_id for w in waiting]
        opens = token == to_device([-1 if s is None else s for s in start], torch.int64, device)
        zero = to_device([params[rows[w]].thinking_token_budget == 0 for w in waiting], torch.bool, device)
        ends = token == tokens.index_select(0, k)
        spent = torch.where(opens, zero, ~ends & ~spared.index_select(0, k))
        spared.index_copy_(0, k, ~spent)
    return to_device(rows, torch.int64, device), tokens, spared


def _bad_word_prefixes(params, recent, in_flight_ids, device) -> BadWordPrefixes | None:
    words = [(i, w) for i, p in enumerate(params) for w in p.bad_words_token_ids if len(w) > 1]
    if not words:
        return None
    n = max(len(w) for _, w in words) - 1
    tail_of = {i: k for k, i in enumerate(sorted({i for i, _ in words}))}
    tails, fix = [], []
    for i in tail_of:
        known, in_flight = recent[i]
        if in_flight is not None:       # a placeholder, filled on the device below
            fix.append((len(tails), in_flight))
            known = known + [0]
        tail = known[-n:]
        tails.append([_NO_OUTPUT] * (n - len(tail)) + tail)
    prefix = [[_NO_TOKEN] * (n + 1 - len(w)) + w[:-1] for _, w in words]
    flat = to_device([[i for i, _ in words], [w[-1] for _, w in words], [tail_of[i] for i, _ in words]],
                     torch.int64, device)
    tails_t = to_device(tails, torch.int64, device)
    if fix:
        index = to_device(list(zip(*fix)), torch.int64, device)
        tails_t[index[0], -1] = in_flight_ids.index_select(0, index[1])
    return BadWordPrefixes(flat[0], to_device(prefix, torch.int64, device), flat[1], flat[2], tails_t)


def apply_logits_processors(logits: torch.Tensor, procs: LogitsProcessors | None,
                            banned_token_ids: list[list[int]] | None) -> torch.Tensor:
    """A new float32 tensor (the caller's logits, and the raw logprobs taken from them, stay untouched).
    banned_token_ids: per row, the ids min_tokens bans (None: none)."""
    logits = logits.to(torch.float32, copy=True)
    if procs is not None and procs.allowed is not None:
        rows, index = procs.allowed
        disallowed = torch.ones((len(rows), logits.shape[1]), dtype=torch.bool, device=logits.device)
        # A device scalar: a Python False would be copied from the host, which waits for the device.
        disallowed.index_put_((index[0], index[1]), torch.zeros((), dtype=torch.bool, device=logits.device))
        logits.index_copy_(0, rows, logits.index_select(0, rows).masked_fill_(disallowed, -float("inf")))
    if procs is not None:
        _apply_bad_words(logits, procs)
    if banned_token_ids is not None:
        rows = [i for i, ids in enumerate(banned_token_ids) for _ in ids]
        index = to_device([rows, [t for ids in banned_token_ids for t in ids]], torch.int64, logits.device)
        logits.index_put_((index[0], index[1]), _neg_inf(logits))
    if procs is not None and procs.logit_bias is not None:   # after the bans, as vLLM's builtin processors run
        index, bias = procs.logit_bias
        logits.index_put_((index[0], index[1]), bias, accumulate=True)
    if procs is not None and procs.penalties is not None:
        apply_penalties(logits, procs.penalties)
    if procs is not None and procs.forced is not None:
        rows, tokens, spared = procs.forced
        only = torch.full((len(rows), logits.shape[1]), -float("inf"), dtype=logits.dtype, device=logits.device)
        only.scatter_(1, tokens[:, None], 0.0)
        logits.index_copy_(0, rows, torch.where(spared[:, None], logits.index_select(0, rows), only))
    return logits


def _apply_bad_words(logits: torch.Tensor, procs: LogitsProcessors):
    if procs.banned is not None:
        logits.index_put_((procs.banned[0], procs.banned[1]), _neg_inf(logits))
    b = procs.bad_word_prefixes
    if b is not None:
        tails = b.tails.index_select(0, b.tail)
        match = ((b.prefix == tails) | (b.prefix == _NO_TOKEN)).all(dim=1)
        # Adding 0 or -inf: words banning the same token of a row accumulate without a write race.
        penalty = torch.where(match, -float("inf"), 0.0).to(logits.dtype)
        logits.index_put_((b.rows, b.last), penalty, accumulate=True)


def _neg_inf(logits: torch.Tensor) -> torch.Tensor:
    return torch.full((), -float("inf"), dtype=logits.dtype, device=logits.device)
