"""A verify step's layout and results: the target scores each speculating row's last token and proposals in
one pass (the same flat batch as every other row), the rejection sampler keeps what the target would have
sampled, and the host gets every row's emitted tokens in one copy.

    row's tokens this step:   t(L-1)  d1  d2  ...  ds        (t(L-1): its last known token)
    logits at:                  p0    p1  p2  ...  ps        pj scores d(j+1); ps is the bonus position
"""
from dataclasses import dataclass

import torch

from pagedllm.core.messages import ModelRunnerOutput, TokenLogprobs
from pagedllm.runner.input_batch import RunnerRequestState
from pagedllm.sample.host_copy import to_device
from pagedllm.sample.sampler import gather_logprobs


@dataclass
class VerifyLayout:
    rows: list[RunnerRequestState]   # the speculating rows, in logits order
    num_spec: list[int]
    logits_index: list[int]          # flat token index of each of their positions (sum(s + 1))
    draft_slots: list[int]           # flat token index of each proposal in the step's input ids (sum(s))

    @classmethod
    def build(cls, reqs: list[RunnerRequestState], spec: dict[str, list[int]], query_start: list[int]):
        rows, num_spec, index, slots = [], [], [], []
        for i, r in enumerate(reqs):
            ids = spec.get(r.req_id)
            if ids is None:
                continue
            start = query_start[i]     # a speculating row is a decode row: its last token, then the proposals
            rows.append(r)
            num_spec.append(len(ids))
            index += range(start, start + len(ids) + 1)
            slots += range(start + 1, start + len(ids) + 1)
        return cls(rows, num_spec, index, slots)


@dataclass
class VerifyResult:
    """Host copies of a verify step's results, read after the step's event."""
    layout: VerifyLayout
    tokens: torch.Tensor                     # (R, max s + 1) emitted tokens, -1 padded
    num_emitted: torch.Tensor                # (R,)
    logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None   # per position: ids, lps, ranks
    draft_valid: dict[str, int] | None = None   # the draft model's valid prefixes, grown by what was fed back

    def apply(self, out: ModelRunnerOutput):
        """Appends each row's emitted tokens to its state and the step's output."""
        tokens, counts = self.tokens.tolist(), self.num_emitted.tolist()
        lp = [t.tolist() for t in self.logprobs] if self.logprobs is not None else None
        offset = 0
        for r, s, row, n in zip(self.layout.rows, self.layout.num_spec, tokens, counts):
            emitted = row[:n]
            r.token_ids.extend(emitted)
            out.sampled_token_ids[r.req_id] = emitted
            if lp is not None and r.params.logprobs is not None:
                k = 1 + r.params.logprobs
                out.logprobs[r.req_id] = [TokenLogprobs(lp[0][offset + j][:k], lp[1][offset + j][:k], lp[2][offset + j])
                                          for j in range(n)]
            if self.draft_valid is not None and r.req_id in self.draft_valid:
                self.draft_valid[r.req_id] += min(n - 1, s - 1)
            offset += s + 1


def position_logprobs(logits: torch.Tensor, tokens: torch.Tensor, num_spec: list[int], num_logprobs: int,
                      chosen: torch.Tensor | None = None):
    """Logprobs (raw, the target's) of the token emitted at each position, -1 (none) scored as token 0.
    chosen: each position's logprob_token_ids (sampler.chosen_logprob_ids)."""
    rows = [i for i, s in enumerate(num_spec) for _ in range(s + 1)]
    cols = [j for s in num_spec for j in range(s + 1)]
    emitted = tokens[to_device(rows, torch.int64, logits.device), to_device(cols, torch.int64, logits.device)]
    return gather_logprobs(logits.float().log_softmax(dim=-1), emitted.clamp_min(0), num_logprobs, chosen)
