"""Attention metadata for one step, and the forward context that carries it to every attention layer.

A step runs one flat batch of tokens from many requests, request after request, no padding:

    input_ids  | r0 t0 t1 t2 | r1 t0 | r2 t0 t1 |        query_start_loc = [0, 3, 4, 6]
    context     r0 had 5 cached tokens, r1 had 9, r2 0    seq_lens        = [8, 10, 2]

Request i's queries are tokens query_start_loc[i]:query_start_loc[i+1]; they sit at the last
(query_len) positions of its seq_lens[i] tokens, whose K/V are read through block_tables[i]
(after this step's new K/V are written to their slots). Query j of request i attends to keys
0 .. seq_lens[i] - query_len + j (causal).
"""
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from pagedllm.attention.shared_prefix import SharedPrefixPlan


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor      # (num_tokens,) int64: cache slot = block_id * block_size + offset
    query_start_loc: torch.Tensor   # (num_reqs + 1,) int32: cumulative query lengths
    seq_lens: torch.Tensor          # (num_reqs,) int32: cached + new tokens after this step
    block_tables: torch.Tensor      # (num_reqs, max_blocks_per_req) int32, padded with 0
    max_query_len: int
    max_seq_len: int
    # Host copies, so that backends that loop over requests need no device->host sync.
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    # Decode segments several rows share, read once for all of them (the Triton backend; others ignore it)
    shared: "SharedPrefixPlan | None" = None

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens_cpu)


@dataclass
class ForwardContext:
    attn_metadata: AttentionMetadata
    kv_caches: list[torch.Tensor]   # per layer: (2, num_blocks, block_size, num_kv_heads, head_dim)


_context: ForwardContext | None = None


@contextmanager
def set_forward_context(attn_metadata: AttentionMetadata, kv_caches: list[torch.Tensor]):
    global _context
    prev, _context = _context, ForwardContext(attn_metadata, kv_caches)
    try:
        yield
    finally:
        _context = prev


def get_forward_context() -> ForwardContext:
    if _context is None:
        raise RuntimeError("attention ran outside set_forward_context(): the model runner sets it per step")
    return _context
