"""Presence, frequency and repetition penalties (vLLM's semantics), from token counts kept on the device.

    repetition:  tokens in the prompt or the output: logit > 0 → logit / p, else logit * p
    frequency:   logit -= frequency_penalty * (times the token is in the output)
    presence:    logit -= presence_penalty  * (token is in the output)

PenaltyTable holds, per request that uses a penalty, its prompt's token set and its output's token counts,
one row (slot) each. The counts grow on the device right after each step samples (`record`), in stream
order: the next step's penalties count the token still in flight, whose id has not reached the host, and no
step rebuilds them from the host's token lists.
"""
from dataclasses import dataclass

import torch

from pagedllm.sample.host_copy import to_device
from pagedllm.sampling_params import SamplingParams


class PenaltyTable:
    def __init__(self, vocab_size: int, device):
        self.vocab_size = vocab_size
        self.device = device
        self.prompt_mask = torch.zeros((0, vocab_size), dtype=torch.bool, device=device)
        self.output_counts = torch.zeros((0, vocab_size), dtype=torch.int32, device=device)
        self.slots: dict[str, int] = {}
        self.free_slots: list[int] = []

    def slot(self, req_id: str, token_ids: list[int], num_prompt_tokens: int) -> int:
        """The request's slot; a new one (its prompt set, zero counts) on the request's first sampling step,
        before it has any output. The prompt is read only then: metadata rebuilds of a batch ask again."""
        slot = self.slots.get(req_id)
        if slot is not None:
            return slot
        if not self.free_slots:
            self._grow()
        slot = self.slots[req_id] = self.free_slots.pop()
        self.output_counts[slot].zero_()
        prompt = to_device(token_ids[:num_prompt_tokens], torch.int64, self.device)
        self.prompt_mask[slot].zero_().index_fill_(0, prompt, True)
        return slot

    def release(self, req_id: str):
        slot = self.slots.pop(req_id, None)
        if slot is not None:
            self.free_slots.append(slot)

    def record(self, slots: torch.Tensor, sampled: torch.Tensor):
        """Count each row's sampled token (slots (P,), sampled (P,)) in its output, on the device."""
        self.output_counts.index_put_((slots, sampled), torch.ones_like(sampled, dtype=torch.int32),
                                      accumulate=True)

    def _grow(self):
        """Doubles the slots (slots are handed out per request, so this is rare); existing slots keep theirs."""
        old = len(self.output_counts)
        new = max(4, 2 * old)
        self.prompt_mask = torch.cat([self.prompt_mask, self.prompt_mask.new_zeros(new - old, self.vocab_size)])
        self.output_counts = torch.cat([self.output_counts,
                                        self.output_counts.new_zeros(new - old, self.vocab_size)])
        self.free_slots.extend(range(new - 1, old - 1, -1))


@dataclass
class Penalties:
    """The rows of a step that use a penalty (others pay nothing), their slots and their values."""
    table: PenaltyTable            # read when applied: its counts include every step sampled before
    rows: torch.Tensor             # (P,) int64 rows of the batch
    slots: torch.Tensor            # (P,) int64 their slots in the table
    presence: torch.Tensor         # (P,) float32
    frequency: torch.Tensor        # (P,) float32
    repetition: torch.Tensor       # (P,) float32

    @classmethod
    def build(cls, table: PenaltyTable, params: list[SamplingParams], slots: list[int | None],
              device) -> "Penalties | None":
        rows = [i for i, s in enumerate(slots) if s is not None]
        if not rows:
            return None
        used = [params[i] for i in rows]
        values = to_device([[p.presence_penalty for p in used], [p.frequency_penalty for p in used],
                            [p.repetition_penalty for p in used]], torch.float32, device)
        index = to_device([rows, [slots[i] for i in rows]], torch.int64, device)
        return cls(table, index[0], index[1], values[0], values[1], values[2])


def apply_penalties(logits: torch.Tensor, p: Penalties) -> torch.Tensor:
    """In place on the penalised rows of (N, V) float32 logits."""
    x = logits.index_select(0, p.rows)
    counts = p.table.output_counts.index_select(0, p.slots)
    in_output = counts > 0
    seen = in_output | p.table.prompt_mask.index_select(0, p.slots)
    rep = p.repetition.unsqueeze(1)
    # Division, not multiplication by 1 / p: the same floats as transformers' RepetitionPenaltyLogitsProcessor.
    x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    x -= p.frequency.unsqueeze(1) * counts
    x -= p.presence.unsqueeze(1) * in_output
    return logits.index_copy_(0, p.rows, x)
