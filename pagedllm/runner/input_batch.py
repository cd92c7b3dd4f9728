"""The runner's per-request state, and the persistent buffers that one step's flat inputs are built in.

Nothing is allocated per step: inputs are written into pinned host arrays, then copied without blocking
into device tensors that live as long as the runner (CUDA graphs replay on the same tensors). Block tables
are updated by diffs: a request's row in `BlockTables` only gains the blocks the scheduler added.
"""
from dataclasses import dataclass, field

import numpy as np
import torch

from pagedllm.attention.metadata import AttentionMetadata
from pagedllm.attention.shared_prefix import SharedPrefixPlan, max_items, plan_shared_prefix
from pagedllm.core.messages import TokenLogprobs
from pagedllm.sampling_params import SamplingParams


@dataclass
class RunnerRequestState:
    req_id: str
    token_ids: list[int]            # prompt + outputs; the runner appends what it samples once it is back
    num_prompt_tokens: int
    params: SamplingParams
    row: int                        # this request's row in BlockTables
    num_blocks: int
    num_computed_tokens: int
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)   # collected over prompt chunks
    prompt_logprobs_sent: bool = False
    # thinking_token_budget: how many of token_ids open_reasoning() has read, and what it found
    think_scanned: int = 0
    think_open: int | None = None

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None and not self.prompt_logprobs_sent

    def open_reasoning(self) -> int | None:
        """Where the open reasoning block of the tokens on the host starts (the index after its start token), or
        None when none is open (SamplingParams.thinking_token_budget). Reads each token once."""
        start, end = self.params.reasoning_start_token_id, self.params.reasoning_end_token_id
        if self.think_scanned == 0 and start is None:   # no start token: the output opens the block
            self.think_scanned = self.think_open = self.num_prompt_tokens
        for i in range(self.think_scanned, len(self.token_ids)):
            t = self.token_ids[i]
            if t == start:
                self.think_open = i + 1
            elif t == end:
                self.think_open = None
        self.think_scanned = len(self.token_ids)
        return self.think_open


@dataclass
class RowView:
    """A row of a step that is not a whole request: one position of a verified request (each token its own
    one-token row, so verification runs the decode kernels), or a pass of the draft model."""
    req_id: str
    token_ids: list[int]
    num_computed_tokens: int
    num_blocks: int
    row: int
    wants_prompt_logprobs: bool = False

    @classmethod
    def of(cls, r: RunnerRequestState, num_computed: int) -> "RowView":
        return cls(r.req_id, r.token_ids, num_computed, r.num_blocks, r.row)


class BlockTables:
    """Host block table of every request the runner holds: one row each, reused after the request ends."""

    def __init__(self, max_blocks_per_req: int, num_rows: int = 64):
        self.table = np.zeros((num_rows, max_blocks_per_req), dtype=np.int32)
        self.free_rows = list(range(num_rows - 1, -1, -1))

    def add(self, block_ids: list[int]) -> int:
        if not self.free_rows:   # grow: rows are only ever handed out, so doubling keeps this rare
            old = len(self.table)
            self.table = np.concatenate([self.table, np.zeros_like(self.table)])
            self.free_rows = list(range(2 * old - 1, old - 1, -1))
        row = self.free_rows.pop()
        self.table[row, :len(block_ids)] = block_ids
        return row

    def set(self, row: int, start: int, block_ids: list[int]):
        self.table[row, start:start + len(block_ids)] = block_ids

    def release(self, row: int):
        self.free_rows.append(row)


@dataclass
class StepInputs:
    input_ids: torch.Tensor                 # (T,) device; T includes decode padding
    positions: torch.Tensor                 # (T,)
    attn_metadata: AttentionMetadata
    sample_rows: list[int]                  # request rows whose last scheduled token reaches the end: they sample
    sample_token_index: torch.Tensor        # (len(sample_rows),) flat index of those last tokens
    prompt_lp_rows: list[tuple[int, int, int]]  # (row, first prompt position, count) scoring prompt tokens


class _HostArrays:
    """One set of pinned host arrays for a step's inputs (numpy views for building them)."""

    def __init__(self, max_tokens: int, max_reqs: int, max_blocks_per_req: int, pin: bool):
        def array(n: int, dtype: torch.dtype):
            t = torch.zeros(n, dtype=dtype, pin_memory=pin)
            return t, t.numpy()

        self.ids_h, self.ids = array(max_tokens, torch.int64)
        self.pos_h, self.pos = array(max_tokens, torch.int64)
        self.slot_h, self.slot = array(max_tokens, torch.int64)
        self.qsl_h, self.qsl = array(max_reqs + 1, torch.int32)
        self.len_h, self.len = array(max_reqs, torch.int32)
        self.sidx_h, self.sidx = array(max_reqs, torch.int64)
        self.bt_h, self.bt = array(max_reqs * max_blocks_per_req, torch.int32)
        self.fix_h, self.fix = array(2 * max_reqs, torch.int64)   # in-flight ids: flat index, then sample row
        self.first_seg_h, self.first_seg = array(max_reqs, torch.int32)       # shared decode segments
        self.items_h, items = array(4 * max_items(max_reqs), torch.int32)
        self.items = items.reshape(-1, 4)
        self.shared_rows_h, self.shared_rows = array(max_reqs, torch.int32)
        self.copied: torch.cuda.Event | None = None    # recorded after the last step's copies from these arrays


class InputBuffers:
    """Pinned host arrays and device tensors for at most max_tokens tokens of max_reqs requests.

    The host arrays come in two sets, used by alternate steps: step N+1 is built while step N's copies may
    still be queued behind step N-1 on the device. Before N+1 writes the set N-1 used, it waits for N-1's
    copies to have run (an event recorded after them): usually long done, since the engine waits for N-1's
    sampled ids first, but a step that samples nothing (a prompt's middle chunk) gives nothing to wait for, and
    the host ran on ahead, rewriting arrays whose copies were still queued: a chunk read another's slots and
    lengths (H100, a tiny model's 64k-token fp32 prompt in 16k chunks: its first token's logprob off by 0.02 to
    0.47, another each run; 2.4 to 3.5 at 120k; since, 2e-4 and 3e-4 from a torch reference, as in one chunk)."""

    def __init__(self, max_tokens: int, max_reqs: int, max_blocks_per_req: int, device: torch.device,
                 shared_rows_per_item: int = 0):
        """shared_rows_per_item: rows of a shared_prefix item (the Triton backend's); 0: no shared segments."""
        pin = device.type == "cuda"
        self.device = device
        self.shared_rows_per_item = shared_rows_per_item
        self.max_blocks_per_req = max_blocks_per_req
        self.max_reqs = max_reqs
        self.hosts = [_HostArrays(max_tokens, max_reqs, max_blocks_per_req, pin) for _ in range(2)]
        self.h = self.hosts[0]

        def zeros(n: int, dtype: torch.dtype):
            return torch.zeros(n, dtype=dtype, device=device)

        self.input_ids = zeros(max_tokens, torch.int64)
        self.positions = zeros(max_tokens, torch.int64)
        self.slot_mapping = zeros(max_tokens, torch.int64)
        self.query_start_loc = zeros(max_reqs + 1, torch.int32)
        self.seq_lens = zeros(max_reqs, torch.int32)
        self.sample_index = zeros(max_reqs, torch.int64)
        self.bt_staging = zeros(max_reqs * max_blocks_per_req, torch.int32)
        self.fix = zeros(2 * max_reqs, torch.int64)
        self.first_seg = zeros(max_reqs, torch.int32)
        self.shared_items = torch.zeros((max_items(max_reqs), 4), dtype=torch.int32, device=device)
        self.shared_rows = zeros(max_reqs, torch.int32)
        # Row i of the step's block table; columns past a request's blocks are stale and never read.
        self.block_tables = torch.zeros((max_reqs, max_blocks_per_req), dtype=torch.int32, device=device)

    def build(self, reqs: list[RunnerRequestState], query_lens: list[int], tables: BlockTables,
              block_size: int, pad_tokens: int | None = None, pad_rows: int | None = None,
              max_seq_len_bound: int | None = None,
              in_flight: dict[str, int] | None = None, in_flight_ids: torch.Tensor | None = None,
              share: bool = False, share_grid: int | None = None) -> StepInputs:
        """Request i runs tokens num_computed .. num_computed + query_lens[i] - 1 of its tokens.

        flat index:   0 1 2 | 3 | 4 5          query_start_loc = [0, 3, 4, 6]
        positions:    5 6 7 | 9 | 0 1          = num_computed[i] + (index - query_start_loc[i])
        slot:         block_table[i][pos // block_size] * block_size + pos % block_size

        A request's last token may still be in flight: the previous step samples it. `in_flight` maps such a
        request to its row in that step's `in_flight_ids` (device), which is copied into input_ids here,
        on the device, without waiting for it.

        pad_tokens, pad_rows: the shape a CUDA graph was captured at. Padding rows have no tokens and
        seq_len 0; padding tokens belong to no row and have slot -1, so attention skips both.
        max_seq_len_bound then replaces the true maximum.

        share: plan the decode segments rows share (attention/shared_prefix.py); share_grid: the item count
        of the graph replayed (the rest padded with empty items), else the plan's own.
        """
        h = self.h = self.hosts[1] if self.h is self.hosts[0] else self.hosts[0]
        if h.copied is not None:
            h.copied.synchronize()
        in_flight = in_flight or {}
        n = len(reqs)
        q = np.asarray(query_lens, dtype=np.int64)
        computed = np.fromiter((r.num_computed_tokens for r in reqs), np.int64, n)
        seq_lens = computed + q
        total = int(q.sum())
        rows = n if pad_rows is None else pad_rows
        num_tokens = total if pad_tokens is None else pad_tokens

        qsl = h.qsl[:rows + 1]
        qsl[0] = 0
        np.cumsum(q, out=qsl[1:n + 1])
        qsl[n + 1:] = total
        h.len[:n] = seq_lens
        h.len[n:rows] = 0

        # Known ids from the host; an id still being sampled is 0 here and filled in on the device.
        ids, cl = h.ids, computed.tolist()
        if total == n:                         # decode only: one token each, no slicing
            ids[:n] = [r.token_ids[c] if c < len(r.token_ids) else 0 for r, c in zip(reqs, cl)]
            rows_in_flight = [i for i, (r, c) in enumerate(zip(reqs, cl)) if c >= len(r.token_ids)]
        else:
            rows_in_flight, k = [], 0
            for i, (r, c, ql) in enumerate(zip(reqs, cl, query_lens)):
                known = min(ql, len(r.token_ids) - c)   # only the last one can be in flight
                ids[k:k + known] = r.token_ids[c:c + known]
                if known < ql:
                    ids[k + known] = 0
                    rows_in_flight.append(i)
                k += ql
        ids[total:num_tokens] = 0

        req_idx = np.repeat(np.arange(n), q)
        positions = h.pos[:total]
        np.subtract(np.arange(total), qsl[req_idx], out=positions)
        positions += computed[req_idx]
        h.pos[total:num_tokens] = 0

        max_blocks = max(r.num_blocks for r in reqs)
        table_rows = np.fromiter((r.row for r in reqs), np.int64, n)
        bt = h.bt[:n * max_blocks].reshape(n, max_blocks)
        np.take(tables.table[:, :max_blocks], table_rows, axis=0, out=bt)
        slots = h.slot[:total]
        # Block ids are int32 (the device tables'); the slot is int64: block_id * block_size passes 2^31
        # once a cache holds 2^31 token slots (int32 times a Python int stays int32 in NumPy and wraps).
        np.add(bt[req_idx, positions // block_size].astype(np.int64) * block_size, positions % block_size,
               out=slots)
        h.slot[total:num_tokens] = -1

        # A row samples when this step reaches the end of its tokens, the one in flight included.
        sample_rows = [i for i, r in enumerate(reqs) if seq_lens[i] >= len(r.token_ids)]
        h.sidx[:len(sample_rows)] = qsl[1:][sample_rows] - 1
        prompt_lp_rows = _prompt_logprob_rows(reqs, computed, seq_lens)

        self._copy(h, num_tokens, rows, n, max_blocks, len(sample_rows))
        shared = None
        if share and self.shared_rows_per_item:
            shared = self._plan_shared(h, bt, q, seq_lens, rows, block_size, share_grid)
        if rows_in_flight:
            dst = (qsl[1:][rows_in_flight] - 1).tolist()
            self._fill_in_flight(h, dst, [in_flight[reqs[i].req_id] for i in rows_in_flight], in_flight_ids)
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:num_tokens], query_start_loc=self.query_start_loc[:rows + 1],
            seq_lens=self.seq_lens[:rows], block_tables=self.block_tables[:rows],
            max_query_len=int(q.max()),
            max_seq_len=int(seq_lens.max()) if max_seq_len_bound is None else max_seq_len_bound,
            query_start_loc_cpu=qsl.tolist(), seq_lens_cpu=h.len[:rows].tolist(), shared=shared)
        if self.device.type == "cuda":
            h.copied = torch.cuda.Event()
            h.copied.record()
        return StepInputs(self.input_ids[:num_tokens], self.positions[:num_tokens], meta, sample_rows,
                          self.sample_index[:len(sample_rows)], prompt_lp_rows)

    def _plan_shared(self, h: _HostArrays, bt: np.ndarray, q: np.ndarray, seq_lens: np.ndarray, rows: int,
                     block_size: int, grid: int | None) -> SharedPrefixPlan | None:
        n = len(q)
        cap = max_items(rows) if grid is None else grid
        k = plan_shared_prefix(bt, q, seq_lens, block_size, self.shared_rows_per_item, cap,
                               h.first_seg, h.items, h.shared_rows)
        if k == 0:
            return None
        grid = k if grid is None else grid
        h.first_seg[n:rows] = 0
        h.items[k:grid] = 0                               # count 0: the graph's spare programs return
        self.first_seg[:rows].copy_(h.first_seg_h[:rows], non_blocking=True)
        self.shared_items[:grid].view(-1).copy_(h.items_h[:4 * grid], non_blocking=True)
        self.shared_rows[:n].copy_(h.shared_rows_h[:n], non_blocking=True)
        return SharedPrefixPlan(self.first_seg[:rows], self.shared_items[:grid], self.shared_rows,
                                self.shared_rows_per_item)

    def fill_padding(self):
        """Every row and token padding (no KV written or read): the state graphs are captured in."""
        self.slot_mapping.fill_(-1)
        self.seq_lens.zero_()
        self.query_start_loc.zero_()
        self.first_seg.zero_()
        self.shared_items.zero_()

    def graph_metadata(self, num_tokens: int, rows: int, mixed: bool, max_seq_len_bound: int,
                       shared: bool = False) -> AttentionMetadata:
        """Metadata of a padded step over the persistent tensors (graph capture). Mixed steps bound the
        query length by num_tokens, which launches the prefill kernel; `shared` decode steps also launch
        shared_prefix over max_items(rows) items."""
        plan = SharedPrefixPlan(self.first_seg[:rows], self.shared_items[:max_items(rows)], self.shared_rows,
                                self.shared_rows_per_item) if shared else None
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:num_tokens], query_start_loc=self.query_start_loc[:rows + 1],
            seq_lens=self.seq_lens[:rows], block_tables=self.block_tables[:rows],
            max_query_len=num_tokens if mixed else 1, max_seq_len=max_seq_len_bound,
            query_start_loc_cpu=[0] * (rows + 1), seq_lens_cpu=[0] * rows, shared=plan)

    def _copy(self, h: _HostArrays, num_tokens: int, rows: int, n: int, max_blocks: int, num_samples: int):
        """Host -> device without blocking (see the class docstring for when `h` is written again)."""
        for src, d, k in ((h.ids_h, self.input_ids, num_tokens), (h.pos_h, self.positions, num_tokens),
                          (h.slot_h, self.slot_mapping, num_tokens), (h.qsl_h, self.query_start_loc, rows + 1),
                          (h.len_h, self.seq_lens, rows), (h.sidx_h, self.sample_index, num_samples),
                          (h.bt_h, self.bt_staging, n * max_blocks)):
            d[:k].copy_(src[:k], non_blocking=True)
        self.block_tables[:n, :max_blocks].copy_(self.bt_staging[:n * max_blocks].view(n, max_blocks))

    def _fill_in_flight(self, h: _HostArrays, dst: list[int], src: list[int], in_flight_ids: torch.Tensor):
        m = len(dst)
        if dst == src == list(range(m)):     # steady decode: the same requests in the same order
            self.input_ids[:m].copy_(in_flight_ids[:m])
            return
        h.fix[:m], h.fix[m:2 * m] = dst, src
        fix = self.fix[:2 * m]
        fix.copy_(h.fix_h[:2 * m], non_blocking=True)
        self.input_ids.index_copy_(0, fix[:m], in_flight_ids.index_select(0, fix[m:]))


def _prompt_logprob_rows(reqs: list[RunnerRequestState], computed: np.ndarray, seq_lens: np.ndarray):
    rows = []
    for i, r in enumerate(reqs):
        if not r.wants_prompt_logprobs:
            continue
        # Position p scores prompt token p + 1: positions up to num_prompt_tokens - 2.
        end = min(int(seq_lens[i]), r.num_prompt_tokens - 1)
        start = max(int(computed[i]), len(r.prompt_logprobs))
        if end > start:
            rows.append((i, start, end - start))
    return rows
