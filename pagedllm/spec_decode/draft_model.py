"""The draft model of speculative decoding: a smaller checkpoint with the target's vocabulary proposes k tokens
a row by greedy decoding, on the device, right before the target verifies them in the same step.

Its KV cache has its own tensors but the target's block ids: the draft reads and writes the slots of the
target's block tables, so no second allocator exists and a request's lookahead slots serve both. Its KV of a
request is right only up to `valid[req_id]` positions, a prefix that it catches up from the known tokens when
the request next speculates (a new or resumed request starts at 0: a prefix-cache hit or a swapped-in block
holds the target's KV only). Of its proposals e1..es, e1..e(s-1) were fed back, so after the verification
accepts a of them the prefix grows by min(a, s - 1) past the last known token.

The next step's passes need only the verify's emitted tokens (and slots: those the row has), so when every row
of a step speculated they are launched right behind the verify (`prepass`), their inputs made on the device,
before the host has read the result: the device runs them while the host applies the step and schedules the
next, which then runs only the passes whose positions had no slot. (A W5 step's H100 trace showed the device
idle there; that host work is ~0.4-0.6 ms a step on the 2-core dev CPU.)
"""
from dataclasses import dataclass

import torch

from pagedllm.attention.metadata import AttentionMetadata, set_forward_context
from pagedllm.config import EngineConfig
from pagedllm.core.kv_cache_manager import cdiv
from pagedllm.distributed.parallel_state import TPGroup
from pagedllm.models import model_dims, served_config
from pagedllm.layers.moe import cuda_graph_blocker
from pagedllm.models.loader import load_model
from pagedllm.models.small_m import SMALL_M_OPS, use_small_m
from pagedllm.runner.cuda_graph import CudaGraphs, capture_sizes
from pagedllm.runner.input_batch import BlockTables, InputBuffers, RowView, RunnerRequestState
from pagedllm.runner.kv_cache import allocate_kv_caches, bytes_per_block
from pagedllm.sample.host_copy import to_device
from pagedllm.spec_decode.prepass_inputs import prepass_inputs


_GRAPH_CATCH_UP = 3   # unfed tokens a row (before its last) that the first proposal pass takes along


@dataclass
class PrePass:
    """The proposal passes launched behind a verify (DraftModel.prepass), for the rows as they were then."""
    req_ids: list[str]
    base_lens: list[int]      # each row's known tokens when the verify launched
    num_spec: list[int]       # its proposals then
    limits: list[int]         # positions with a slot then (the row's blocks): the pass fed nothing past them
    proposals: torch.Tensor   # (R, s) the draft's tokens after each row's last emitted one


def draft_hf_config(model_dir: str, target_hf_config):
    """The draft checkpoint's HF config; ValueError unless it has the target's vocabulary."""
    from transformers import AutoConfig
    hf_config = served_config(AutoConfig.from_pretrained(model_dir))
    if hf_config.vocab_size != target_hf_config.vocab_size:
        raise ValueError(f"speculative_config: model {model_dir!r} must have the target's vocabulary "
                         f"({target_hf_config.vocab_size} tokens), got {hf_config.vocab_size}")
    return hf_config


class DraftModel:
    def __init__(self, config: EngineConfig, target_hf_config, device: torch.device, dtype: torch.dtype,
                 max_model_len: int, tp: TPGroup = TPGroup()):
        """tp: the target's group. As vLLM's default draft_tensor_parallel_size, the draft is sharded over the
        target's ranks as the target is (each reads its slices); every rank runs its passes with the same inputs
        and takes the same argmax of the all-gathered logits, so the proposals agree without being sent.
        With enable_lora the draft runs without adapters (as vLLM's; its model is not wrapped): a request under an
        adapter gets the base draft's proposals, and the target's verify applies the adapter to each of them."""
        spec = config.speculative
        self.hf_config = draft_hf_config(spec.model, target_hf_config)
        # its own quantization, not the target's --quantization (as vLLM)
        self.model = load_model(spec.model, self.hf_config, dtype, device, config.load_format,
                                spec.quantization, tp, max_model_len)
        self.num_layers, self.num_kv_heads, self.head_dim = model_dims(self.hf_config, tp)   # this rank's heads
        if device.type == "cuda":   # batch-1 passes are launch-bound: all four linears fused (W5 -4% on an H100)
            use_small_m(self.model, SMALL_M_OPS)
        self.block_bytes = bytes_per_block(self.num_layers, config.block_size, self.num_kv_heads, self.head_dim,
                                           dtype)
        self.device, self.dtype, self.block_size = device, dtype, config.block_size
        self.max_model_len = max_model_len
        self.max_batch_tokens = config.max_num_batched_tokens
        max_reqs = config.max_num_seqs
        max_rows = max_reqs + _GRAPH_CATCH_UP * min(max_reqs, spec.disable_by_batch_size)   # first pass's rows
        self.buffers = InputBuffers(max(config.max_num_batched_tokens, max_rows), max_rows,
                                    cdiv(max_model_len, config.block_size), device)
        self.graphs = None   # the proposal passes (one token a row) in graphs, unless a MoE draft cannot be captured
        if device.type == "cuda" and not config.enforce_eager and cuda_graph_blocker(self.model, device) is None:
            self.graphs = CudaGraphs(capture_sizes(min(max_reqs, spec.disable_by_batch_size) * (1 + _GRAPH_CATCH_UP)),
                                     [])
        self.kv_caches: list[torch.Tensor] = []
        self.valid: dict[str, int] = {}   # req_id -> leading positions whose draft KV is right
        self.pre: PrePass | None = None    # launched behind the last step's verify, for the next step

    def allocate(self, num_blocks: int):
        self.kv_caches = allocate_kv_caches(self.num_layers, num_blocks, self.block_size, self.num_kv_heads,
                                            self.head_dim, self.dtype, self.device)
        if self.device.type == "cuda":
            from pagedllm.spec_decode.prepass_kernel import compile_prepass_inputs
            compile_prepass_inputs(self.buffers, self.block_size, self.device)
        if self.graphs is not None:
            self.buffers.fill_padding()
            self.graphs.capture(self._graph_forward)

    def reset(self, req_id: str):
        self.valid[req_id] = 0

    def forget(self, req_id: str):
        self.valid.pop(req_id, None)

    @torch.inference_mode()
    def propose(self, rows: list[RunnerRequestState], num_spec: list[int],
                catch_up: list[tuple[RunnerRequestState, int]], tables: BlockTables) -> torch.Tensor:
        """(len(rows), max(num_spec)) int64 on the device: row i's proposals in its first num_spec[i] columns.
        rows: requests whose last known token the target verifies after; catch_up: other rows of the step and
        the position their step reaches (prompt chunks), whose draft KV is brought along.

        The first pass feeds each row's tokens from its valid prefix to its last known token, each a one-token
        row (a fully accepted draft leaves two: the last proposal and the target's token), and proposes e1 from
        the last; each later pass feeds the proposal before. Longer gaps are caught up first (_catch_up).
        Passes that ran behind the last verify (prepass) are not run again: a row starts at its depth."""
        pre, self.pre = self.pre, None
        depth = self._prepass_depth(pre, rows) if pre is not None and not catch_up else [0] * len(rows)
        far = [(r, len(r.token_ids) - 1) for r in rows
               if len(r.token_ids) - 1 - self.valid.get(r.req_id, 0) > _GRAPH_CATCH_UP]
        self._catch_up(far + catch_up, tables)
        width = max(num_spec)
        out = torch.zeros((len(rows), width), dtype=torch.int64, device=self.device)
        if any(depth):   # passes that ran behind the verify (prepass): their proposals
            served = min(width, pre.proposals.shape[1])
            out[:, :served] = pre.proposals[:, :served]   # columns past a row's depth are written below
        for j in range(width):
            live = [i for i, s in enumerate(num_spec) if depth[i] <= j < s]
            if not live:
                continue
            if j == 0:
                ids = self._first_pass([rows[i] for i in live], tables)
            else:   # each feeds its proposal before, still on the device (column j - 1)
                views = [RowView.of(rows[i], len(rows[i].token_ids) - 1 + j) for i in live]
                ids = self._forward_last(views, tables, in_flight={rows[i].req_id: i for i in live},
                                         in_flight_ids=out[:, j - 1])
            if len(live) == len(rows):
                out[:, j] = ids
            else:
                out[to_device(live, torch.int64, self.device), j] = ids
        for r in rows:
            self.valid[r.req_id] = len(r.token_ids)   # fed up to the last known token (then e1..e(s-1))
        return out

    def _first_pass(self, rows: list[RunnerRequestState], tables: BlockTables) -> torch.Tensor:
        """Each row's tokens from its valid prefix to its last known one, each a one-token row; the draft's
        token after the last."""
        views = [RowView.of(r, p) for r in rows for p in range(self.valid.get(r.req_id, 0), len(r.token_ids))]
        return self._forward_last(views, tables, in_flight=None, in_flight_ids=None)

    def _prepass_depth(self, pre: PrePass, rows: list[RunnerRequestState]) -> list[int]:
        """Each row's passes that ran behind the verify: the same rows as then, each now m = 1 .. s + 1 tokens
        past its base (a verify's emitted tokens, nothing since), its draft KV grown by min(m - 1, s - 1)
        (VerifyResult.apply); pass j fed position base + m - 1 + (j - 1), which had a slot only below the
        row's limit then (else that pass and those after it fed nothing). 0: none."""
        if [r.req_id for r in rows] != pre.req_ids:
            return [0] * len(rows)
        depth = []
        for r, base, s, limit in zip(rows, pre.base_lens, pre.num_spec, pre.limits):
            m = len(r.token_ids) - base
            ok = 1 <= m <= s + 1 and self.valid.get(r.req_id) == base + min(m - 1, s - 1)
            depth.append(max(0, min(pre.proposals.shape[1], limit - (base + m - 1))) if ok else 0)
        return depth

    @torch.inference_mode()
    def prepass(self, rows: list[RunnerRequestState], num_spec: list[int], tables: BlockTables,
                tokens: torch.Tensor, num_emitted: torch.Tensor):
        """The next step's proposal passes, launched right behind the verify whose rejection sampling gave
        tokens (R, max s + 1) and num_emitted (R,) on the device. Row i then knows m = num_emitted[i] more
        tokens; its draft KV lacks the last one, and e_s too when all s were accepted (m = s + 1). So each row
        is two one-token rows: e_s at its position, or a copy of the second (the same K/V written twice), then
        the last emitted token. A token past the row's current slots is not fed (slot -1; it reads its first
        block), and the next step sees that in _prepass_depth and runs that row's own first pass. The later passes
        follow, one row a request, each feeding the proposal before while its position has a slot."""
        dev = self.device
        lens = [len(r.token_ids) for r in rows]
        limits = [r.num_blocks * self.block_size for r in rows]
        base, spec, limit = to_device([lens, list(num_spec), limits], torch.int64, dev)   # one copy
        max_blocks = max(r.num_blocks for r in rows)
        table = to_device(tables.table[[r.row for r in rows], :max_blocks], torch.int32, dev)
        verified = (tokens, num_emitted, base, spec, limit, table)
        hidden = self._prepass_forward(self._prepass_layout(table.repeat_interleave(2, 0)), verified, None, 0)
        ids = [self.model.compute_logits(hidden[1::2]).argmax(dim=-1)]
        # Pass j + 1 feeds position base + m - 1 + j, m >= 1: none of the rows has a slot there from j = max(limit -
        # base) on, whatever the verify accepted, so those passes are not launched
        passes = min(max(num_spec), max(lim - n_known for n_known, lim in zip(lens, limits)))
        if passes > 1:
            size = self._prepass_layout(table)
        for j in range(1, passes):
            hidden = self._prepass_forward(size, verified, ids[-1], j)
            ids.append(self.model.compute_logits(hidden).argmax(dim=-1))
        self.pre = PrePass([r.req_id for r in rows], lens, list(num_spec), limits, torch.stack(ids, 1))

    def _prepass_layout(self, table: torch.Tensor) -> int:
        """One-token rows through block table rows `table`, padded to a graph's size (returned): the parts of
        the buffers that the pre-pass's passes of one shape share."""
        b, k = self.buffers, table.shape[0]
        size = k if self.graphs is None else self.graphs.padded_size(k, False)
        b.block_tables[:k, :table.shape[1]] = table
        b.query_start_loc[:size + 1] = torch.arange(size + 1, device=table.device).clamp_(max=k)
        b.input_ids[k:size], b.positions[k:size], b.slot_mapping[k:size], b.seq_lens[k:size] = 0, 0, -1, 0
        return size

    def _prepass_forward(self, size: int, verified: tuple, prev_ids: torch.Tensor | None, j: int) -> torch.Tensor:
        """Pass j on the layout's rows (_prepass_layout), fed as prepass_inputs makes them from verified (the
        verify's tokens and counts; the rows' lengths, proposals, limits and block table) and pass j - 1's
        proposals. Their hidden states."""
        b = self.buffers
        k = prepass_inputs(b, *verified, prev_ids, j, self.block_size)
        if self.graphs is not None:
            return self.graphs.replay(size, False)[:k]
        seq_lens = b.seq_lens[:k].tolist()   # eager: the host's copies of the lengths (a CPU)
        meta = AttentionMetadata(
            slot_mapping=b.slot_mapping[:k], query_start_loc=b.query_start_loc[:k + 1], seq_lens=b.seq_lens[:k],
            block_tables=b.block_tables[:k], max_query_len=1, max_seq_len=max(seq_lens),
            query_start_loc_cpu=list(range(k + 1)), seq_lens_cpu=seq_lens)
        with set_forward_context(meta, self.kv_caches):
            return self.model(b.input_ids[:k], b.positions[:k])

    def _catch_up(self, targets: list[tuple[RunnerRequestState, int]], tables: BlockTables):
        """Feed each row's known tokens from its valid prefix up to (not including) the given position, in
        eager passes of at most max_num_batched_tokens tokens."""
        todo = [(r, self.valid.get(r.req_id, 0), end) for r, end in targets if self.valid.get(r.req_id, 0) < end]
        while todo:
            budget, views, lens, rest = self.max_batch_tokens, [], [], []
            for r, start, end in todo:
                n = min(end - start, budget)
                if n > 0:
                    views.append(RowView.of(r, start))
                    lens.append(n)
                    budget -= n
                    self.valid[r.req_id] = start + n
                if start + n < end:
                    rest.append((r, start + n, end))
            self._forward(views, lens, tables)
            todo = rest

    def _forward(self, views: list[RowView], lens: list[int], tables: BlockTables, graph_size: int | None = None,
                 in_flight=None, in_flight_ids=None):
        pad = graph_size
        inputs = self.buffers.build(views, lens, tables, self.block_size, pad_tokens=pad, pad_rows=pad,
                                    max_seq_len_bound=None if pad is None else self.max_model_len,
                                    in_flight=in_flight, in_flight_ids=in_flight_ids)
        if pad is not None:
            return self.graphs.replay(pad, False), inputs
        with set_forward_context(inputs.attn_metadata, self.kv_caches):
            return self.model(inputs.input_ids, inputs.positions), inputs

    def _forward_last(self, views: list[RowView], tables: BlockTables, in_flight, in_flight_ids) -> torch.Tensor:
        """One-token rows (a decode graph's pass): the draft's greedy next token after each request's last."""
        size = None if self.graphs is None else self.graphs.padded_size(len(views), False)
        hidden, inputs = self._forward(views, [1] * len(views), tables, size, in_flight, in_flight_ids)
        return self.model.compute_logits(hidden[inputs.sample_token_index]).argmax(dim=-1)

    def _graph_forward(self, num_tokens: int, mixed: bool, shared: bool, lora: bool) -> torch.Tensor:
        b = self.buffers
        meta = b.graph_metadata(num_tokens, num_tokens, False, self.max_model_len)
        with set_forward_context(meta, self.kv_caches):
            return self.model(b.input_ids[:num_tokens], b.positions[:num_tokens])


