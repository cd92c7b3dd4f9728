"""Verifies deterministic proposals (n-gram lookup, a draft model's argmax) against the target model:
standard speculative sampling with a one-hot proposal distribution q, so the emitted tokens follow exactly
the distribution that plain decoding with pagedllm's Sampler would draw from.

    row i, s_i drafts:   positions  0    1   ...  s_i-1 | s_i (bonus)
                         drafts     d_0  d_1 ...  d_s-1 |
    greedy row:  accept d_j while d_j == argmax p_j
    random row:  accept d_j with probability p_j(d_j)   (q(d_j) = 1, so min(1, p/q) = p)
    first rejection at j: emit a draw from p_j without d_j (= norm(max(p_j - q_j, 0)))
    all accepted:         emit a draw from p_{s_i} (greedy: its argmax)
    seeded row:  t_j = the token plain sampling draws from p_j with the seed of its output index;
                 accept d_j while d_j == t_j, then emit t_j (d_j is accepted with probability p_j(d_j), and
                 every emitted token is a draw from its p_j: the same law, coupled to plain sampling's draws)

Rows are padded to (R, max_s) on the device; the layout is built on the host from num_draft (a host list)
and sent in one copy, so nothing waits for the device. A seeded row's randomness comes only from its seed and
its tokens' indices, so it gets the tokens that plain sampling gives it, whatever its batch and however many
proposals it gets (the forward's rounding aside).
"""
from dataclasses import dataclass

import numpy as np
import torch

from pagedllm.sample.host_copy import to_device
from pagedllm.sample.sampler import (Sampler, SamplingMetadata, apply_min_p, apply_temperature, apply_top_k_top_p,
                                     exponential_race)
from pagedllm.sampling_params import _GREEDY_EPS


@dataclass
class RejectionOutput:
    output_token_ids: torch.Tensor   # (R, max_s + 1) int64: emitted tokens of each row, padded with -1
    num_emitted: torch.Tensor        # (R,) int64: accepted drafts + 1 (the recovered or bonus token)


@dataclass
class _Layout:
    """Where each row's positions and drafts live in the flat inputs (device tensors)."""
    pos: torch.Tensor          # (R, max_s + 1): flat logits row of position j (past s_i: the bonus position)
    draft_idx: torch.Tensor    # (R, max_s): index into draft_token_ids (past s_i - 1: the last draft)
    num_draft: torch.Tensor    # (R,)
    row_of_pos: torch.Tensor   # (T,): the request row of each flat position
    max_s: int

    @classmethod
    def build(cls, num_draft: list[int], device) -> "_Layout":
        """Built with numpy on the host (a Python loop over positions cost ~10 us a row; torch ops on the
        device ~15 us each at R = 1), then sent in one copy."""
        assert num_draft and min(num_draft) >= 1, num_draft
        s = np.asarray(num_draft, dtype=np.int64)
        r, max_s = len(s), int(s.max())
        j = np.arange(max_s + 1)
        pos = (np.cumsum(s + 1) - (s + 1))[:, None] + np.minimum(j, s[:, None])
        draft_idx = (np.cumsum(s) - s)[:, None] + np.minimum(j[:-1], s[:, None] - 1)
        row_of_pos = np.repeat(np.arange(r), s + 1)
        flat = to_device(np.concatenate((pos.ravel(), draft_idx.ravel(), s, row_of_pos)), torch.int64, device)
        pos, draft_idx, s, row_of_pos = flat.split([pos.size, draft_idx.size, r, row_of_pos.size])
        return cls(pos.view(r, max_s + 1), draft_idx.view(r, max_s), s, row_of_pos, max_s)


def rejection_sample(logits: torch.Tensor, num_draft: list[int], draft_token_ids: torch.Tensor,
                     meta: SamplingMetadata, generator: torch.Generator | None,
                     synthetic_rates: list[float] | None = None,
                     position_meta: SamplingMetadata | None = None) -> RejectionOutput:
    """logits (sum(s_i + 1), V): row i's s_i + 1 consecutive positions; draft_token_ids (sum(s_i),) int64;
    meta: one entry per row; generator: for unseeded rows (None = torch's default). synthetic_rates:
    benchmark mode, draft j accepted with probability synthetic_rates[j] given draft j-1 was.
    position_meta: one entry per position, each with its row's parameters and, in seeded sampled rows, the
    seed of its token's output index; given when any row is seeded."""
    assert meta.processors is None and meta.banned_token_ids is None, "rows with processors do not speculate"
    layout = _Layout.build(num_draft, logits.device)
    drafts = draft_token_ids[layout.draft_idx]                               # (R, max_s)
    valid = torch.arange(layout.max_s, device=logits.device) < layout.num_draft.unsqueeze(1)
    argmax = None if not meta.any_greedy else logits.argmax(dim=-1)[layout.pos]          # (R, max_s + 1)
    probs = None if meta.all_greedy else target_probs(logits, meta, layout.row_of_pos)  # (T, V)
    need_u = synthetic_rates is not None or not meta.all_greedy
    u = torch.rand((len(num_draft), layout.max_s), generator=generator, device=logits.device) if need_u else None
    coupled = None
    if synthetic_rates is not None:
        assert len(synthetic_rates) >= layout.max_s, (synthetic_rates, layout.max_s)
        accept = u < to_device(synthetic_rates[:layout.max_s], torch.float32, logits.device)
    else:
        accept = accept_drafts(drafts, argmax, probs, layout.pos, u, meta)
        if position_meta is not None and position_meta.seeds:
            coupled, seeded = coupled_draws(logits, num_draft, position_meta, generator, layout)
            accept = torch.where(seeded, drafts == coupled[:, :-1], accept)
    num_accepted = (accept & valid).cumprod(dim=1).sum(dim=1)               # (R,): leading accepts
    token = emit_tokens(num_accepted, drafts, argmax, probs, layout, meta, generator)
    if coupled is not None:
        token = torch.where(seeded.squeeze(1), coupled.gather(1, num_accepted.unsqueeze(1)).squeeze(1), token)
    return RejectionOutput(_assemble(drafts, num_accepted, token), num_accepted + 1)


def coupled_draws(logits: torch.Tensor, num_draft: list[int], position_meta: SamplingMetadata,
                  generator: torch.Generator | None, layout: _Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, max_s + 1): plain sampling's draw at each position (unseeded rows' are discarded); (R, 1) bool:
    the seeded rows."""
    tokens = Sampler.sample(logits, position_meta, generator)[layout.pos]
    first = np.cumsum([0] + [s + 1 for s in num_draft[:-1]])
    seeded = to_device([int(p) in position_meta.seeds for p in first], torch.bool, logits.device)
    return tokens, seeded.unsqueeze(1)


def target_probs(logits: torch.Tensor, meta: SamplingMetadata, row_of_pos: torch.Tensor) -> torch.Tensor:
    """(T, V) float32: the distribution the Sampler draws from, each position with its row's settings."""
    logits = apply_temperature(logits.float(), meta.temperature[row_of_pos])   # a new tensor: masks in place
    if meta.min_p is not None:
        logits = apply_min_p(logits, meta.min_p[row_of_pos])
    top_k = None if meta.top_k is None else meta.top_k[row_of_pos]
    top_p = None if meta.top_p is None else meta.top_p[row_of_pos]
    return apply_top_k_top_p(logits, top_k, top_p, meta.max_top_k, meta.top_k_bounded).softmax(dim=-1)


def accept_drafts(drafts: torch.Tensor, argmax: torch.Tensor | None, probs: torch.Tensor | None,
                  pos: torch.Tensor, u: torch.Tensor | None, meta: SamplingMetadata) -> torch.Tensor:
    """(R, max_s) bool: whether each draft, taken alone, is accepted (the caller keeps the leading run)."""
    greedy = None if argmax is None else drafts == argmax[:, :-1]
    if meta.all_greedy:
        return greedy
    draft_probs = probs[pos[:, :-1], drafts]                                 # p_j(d_j)
    sampled = u < draft_probs
    return sampled if greedy is None else torch.where(_greedy_rows(meta), greedy, sampled)


def emit_tokens(num_accepted: torch.Tensor, drafts: torch.Tensor, argmax: torch.Tensor | None,
                probs: torch.Tensor | None, layout: _Layout, meta: SamplingMetadata,
                generator: torch.Generator | None) -> torch.Tensor:
    """(R,): the token after the accepted drafts: the recovered token at the first rejection, or the bonus."""
    at = num_accepted.unsqueeze(1)
    greedy = None if argmax is None else argmax.gather(1, at).squeeze(1)
    if meta.all_greedy:
        return greedy
    rejected = num_accepted < layout.num_draft
    rejected_draft = drafts.gather(1, at.clamp(max=layout.max_s - 1)).squeeze(1)
    emit_probs = recovery_probs(probs[layout.pos.gather(1, at).squeeze(1)], rejected_draft, rejected)
    sampled = exponential_race(emit_probs, {}, generator)   # seeded rows' tokens: coupled_draws
    return sampled if greedy is None else torch.where(_greedy_rows(meta).squeeze(1), greedy, sampled)


def recovery_probs(probs: torch.Tensor, rejected_draft: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """In place on (R, V) rows: p without the rejected draft (the race needs no renormalising); bonus rows
    (nothing rejected) keep p."""
    index = rejected_draft.unsqueeze(1)
    kept = probs.gather(1, index) * ~rejected.unsqueeze(1)
    return probs.scatter_(1, index, kept)


def _greedy_rows(meta: SamplingMetadata) -> torch.Tensor:
    return (meta.temperature < _GREEDY_EPS).unsqueeze(1)


def _assemble(drafts: torch.Tensor, num_accepted: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """(R, max_s + 1): the accepted drafts, the emitted token, then -1."""
    col = torch.arange(drafts.shape[1] + 1, device=drafts.device)
    at = num_accepted.unsqueeze(1)
    padded = torch.nn.functional.pad(drafts, (0, 1), value=-1)
    out = torch.where(col < at, padded, torch.full_like(padded, -1))
    return torch.where(col == at, token.unsqueeze(1), out)
