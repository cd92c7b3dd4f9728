"""The runner's per-request state, and the flat inputs of one step built from it."""
from dataclasses import dataclass, field

import numpy as np
import torch

from pagedllm.attention.metadata import AttentionMetadata
from pagedllm.core.messages import TokenLogprobs
from pagedllm.sampling_params import SamplingParams


@dataclass
class RunnerRequestState:
    req_id: str
    token_ids: list[int]            # prompt + outputs; the runner appends what it samples
    num_prompt_tokens: int
    params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    generator: torch.Generator | None
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)   # collected over prompt chunks
    prompt_logprobs_sent: bool = False

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None and not self.prompt_logprobs_sent


@dataclass
class StepInputs:
    input_ids: torch.Tensor                 # (T,)
    positions: torch.Tensor                 # (T,)
    attn_metadata: AttentionMetadata
    sample_rows: list[int]                  # request rows whose last scheduled token reaches the end: they sample
    sample_token_index: torch.Tensor        # (len(sample_rows),) flat index of those last tokens
    prompt_lp_rows: list[tuple[int, int, int]]  # (row, first prompt position, count) scoring prompt tokens


def build_step_inputs(reqs: list[RunnerRequestState], query_lens: list[int], block_size: int,
                      device: torch.device) -> StepInputs:
    """Request i runs tokens num_computed .. num_computed + query_lens[i] - 1 of its known tokens.

    flat index:   0 1 2 | 3 | 4 5          query_start_loc = [0, 3, 4, 6]
    positions:    5 6 7 | 9 | 0 1          = num_computed[i] + (index - query_start_loc[i])
    slot:         block_table[i][pos // block_size] * block_size + pos % block_size
    """
    n = len(reqs)
    q = np.asarray(query_lens, dtype=np.int64)
    computed = np.fromiter((r.num_computed_tokens for r in reqs), np.int64, n)
    seq_lens = computed + q
    qsl = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(q, out=qsl[1:])
    total = int(qsl[-1])

    input_ids: list[int] = []
    for r, c, ql in zip(reqs, computed.tolist(), query_lens):
        input_ids.extend(r.token_ids[c:c + ql])
    req_idx = np.repeat(np.arange(n), q)
    positions = np.arange(total) - qsl[req_idx] + computed[req_idx]

    max_blocks = max(len(r.block_ids) for r in reqs)
    block_table = np.zeros((n, max_blocks), dtype=np.int64)
    for i, r in enumerate(reqs):
        block_table[i, :len(r.block_ids)] = r.block_ids
    slots = block_table[req_idx, positions // block_size] * block_size + positions % block_size

    sample_rows = [i for i, r in enumerate(reqs) if seq_lens[i] == len(r.token_ids)]
    prompt_lp_rows = []
    for i, r in enumerate(reqs):
        # Position p scores prompt token p + 1: positions up to num_prompt_tokens - 2.
        end = min(int(seq_lens[i]), r.num_prompt_tokens - 1)
        start = max(int(computed[i]), len(r.prompt_logprobs))
        if r.wants_prompt_logprobs and end > start:
            prompt_lp_rows.append((i, start, end - start))

    def to_dev(a, dtype):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype, non_blocking=True)

    meta = AttentionMetadata(
        slot_mapping=to_dev(slots, torch.int64), query_start_loc=to_dev(qsl, torch.int32),
        seq_lens=to_dev(seq_lens, torch.int32), block_tables=to_dev(block_table, torch.int32),
        max_query_len=int(q.max()), max_seq_len=int(seq_lens.max()),
        query_start_loc_cpu=qsl.tolist(), seq_lens_cpu=seq_lens.tolist())
    return StepInputs(
        input_ids=torch.tensor(input_ids, dtype=torch.int64).to(device, non_blocking=True),
        positions=to_dev(positions, torch.int64), attn_metadata=meta, sample_rows=sample_rows,
        sample_token_index=to_dev(qsl[1:][sample_rows] - 1, torch.int64), prompt_lp_rows=prompt_lp_rows)
