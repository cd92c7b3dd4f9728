"""Which decode segments several rows share: the host plan of kernels/shared_prefix.py (cascade attention).

Decode rows that hit the prefix cache on the same prompt start with the same physical blocks. Split-KV
decode cuts every row's context into PARTITION-token segments; a segment made of blocks that a group of
rows all have at the same place holds the same K/V for all of them, so one program can read it once for
up to rows_per_item rows. W3 (512 rows, 8 prompts of 2,000 shared tokens): 3 of a row's 5 segments.

    items: (segment, start, count, table row): rows[start:start + count] share `segment`, read through
           the block table of step row `table row`
    first_seg[r]: segments 0 .. first_seg[r] - 1 of step row r come from items; decode_partition skips them

Only whole segments of rows short enough for PARTITION-token segments (decode_partition.segment_len), so
the segments, and the order decode_reduce merges them in, are those the row has anyway.
"""
from dataclasses import dataclass

import numpy as np
import torch


def max_items(num_rows: int) -> int:
    """Items a step of num_rows rows may have (the grid of its CUDA graph): W3's 512 rows need 96."""
    return 2 * num_rows + 16


@dataclass
class SharedPrefixPlan:
    first_seg: torch.Tensor      # (num_reqs,) int32 device
    items: torch.Tensor          # (grid, 4) int32 device; rows past the step's items have count 0
    rows: torch.Tensor           # (>= items' rows,) int32 device: step rows, group after group
    rows_per_item: int           # the kernel's ROWS (a constexpr)


def plan_shared_prefix(block_tables: np.ndarray, query_lens: np.ndarray, seq_lens: np.ndarray,
                       block_size: int, rows_per_item: int, max_items: int,
                       first_seg: np.ndarray, items: np.ndarray, rows: np.ndarray) -> int:
    """Fill first_seg[:n], items[:k] and rows[:m] for the step (n rows); return k (0: nothing shared).

    Rows are grouped by their first block; a group shares the whole segments its rows' tables agree on,
    before every row's last token. Groups that would pass max_items items are left to decode_partition."""
    from pagedllm.attention import triton_backend   # Triton, CUDA only; a lookup next to the numpy work below
    n = len(seq_lens)
    first_seg[:n] = 0
    partition, max_segments = triton_backend.PARTITION, triton_backend.MAX_SEGMENTS   # read now: tests shrink them
    if partition % block_size:
        return 0
    if (n <= triton_backend.SMALL_BATCH_ROWS and (query_lens == 1).all()
            and seq_lens.sum() < triton_backend.SMALL_BATCH_SHARE_FROM):
        return 0
    cand = np.flatnonzero((query_lens == 1) & (seq_lens > partition) & (seq_lens <= partition * max_segments))
    if len(cand) < 2:
        return 0
    heads = block_tables[cand, 0]
    order = np.argsort(heads, kind="stable")
    cand, heads = cand[order], heads[order]
    starts = np.flatnonzero(np.r_[True, heads[1:] != heads[:-1]])
    sizes = np.diff(np.r_[starts, len(cand)])
    seg_blocks = partition // block_size
    num_items = num_rows = 0
    for s, size in zip(starts[sizes > 1].tolist(), sizes[sizes > 1].tolist()):
        group = cand[s:s + size]
        # whole segments before every row's last token (whose block is that row's own)
        max_blocks = int((seq_lens[group].min() - 1) // partition) * seg_blocks
        if max_blocks == 0:
            continue
        tables = block_tables[group, :max_blocks]
        agree = np.logical_and.accumulate(tables == tables[0], axis=1).sum(axis=1).min()
        num_segs = int(agree) // seg_blocks
        chunks = -(-size // rows_per_item)
        if num_segs == 0 or num_items + num_segs * chunks > max_items:
            continue
        for seg in range(num_segs):     # one segment's items next to each other: they read the same K/V
            for c in range(chunks):
                items[num_items] = (seg, num_rows + c * rows_per_item, min(rows_per_item, size - c * rows_per_item),
                                    group[0])
                num_items += 1
        rows[num_rows:num_rows + size] = group
        num_rows += size
        first_seg[group] = num_segs
    return num_items
