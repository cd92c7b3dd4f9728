"""ModelRunner: turns a SchedulerOutput into one forward pass over the paged KV cache, and samples.

execute_async() launches the step's device work and returns at once; PendingOutput.result() waits for the
one device -> host copy of the sampled ids. The engine launches step N+1 before it asks for step N's result,
so the device always has the next step queued: a token step N samples is step N+1's input straight from
the device (`_in_flight`), and reaches the host (RunnerRequestState.token_ids) with N's result().
"""
import logging
import time
from itertools import accumulate
from dataclasses import dataclass

import torch

from pagedllm.attention.kv_quant import resolve_kv_cache_dtype
from pagedllm.attention.metadata import set_forward_context
from pagedllm.attention.shared_prefix import max_items
from pagedllm.config import EngineConfig
from pagedllm.core.kv_cache_manager import cdiv
from pagedllm.distributed.parallel_state import TPGroup
from pagedllm.core.messages import ModelRunnerOutput, SchedulerOutput, TokenLogprobs
from pagedllm.models import model_dims
from pagedllm.layers.attention import Attention
from pagedllm.layers.moe import SparseMoeBlock, cuda_graph_blocker
from pagedllm.models.loader import load_model
from pagedllm.models.small_m import TARGET_SMALL_M_OPS, use_small_m
from pagedllm.runner.cuda_graph import CudaGraphs, capture_sizes, mixed_capture_sizes, mixed_graph_token_cap
from pagedllm.runner.input_batch import BlockTables, InputBuffers, RowView, RunnerRequestState, StepInputs
from pagedllm.runner.kv_cache import (allocate_kv_caches, bytes_per_block, check_asked_size_fits,
                                      determine_num_blocks)
from pagedllm.runner.kv_offload import KVOffload, copy_blocks, copy_scratch_bytes
from pagedllm.profiler import RankProfiler
from pagedllm.runner.memory_profile import profile_free_kv_bytes
from pagedllm.sample.logits_processors import build_logits_processors, uses_processors
from pagedllm.sample.penalties import Penalties, PenaltyTable
from pagedllm.sample.sampler import (Sampler, SamplingMetadata, chosen_logprob_ids, gather_logprobs, position_seed,
                                     to_device)
from pagedllm.sampling_params import SamplingParams
from pagedllm.spec_decode.draft_model import DraftModel
from pagedllm.spec_decode.rejection_sampler import rejection_sample
from pagedllm.spec_decode.verify import VerifyLayout, VerifyResult, position_logprobs

logger = logging.getLogger("pagedllm")

PROMPT_LOGPROBS_ROWS = 1024   # prompt positions whose logits are computed at once (~0.5 GB at 128k vocab)
PREPASS_ON_CPU = False   # DraftModel.prepass on a CPU (its tests; see ModelRunner._prepass_due)


class ModelRunner:
    def __init__(self, config: EngineConfig, hf_config, device: torch.device, dtype: torch.dtype,
                 max_model_len: int, tp: TPGroup = TPGroup()):
        """tp: this rank's tensor-parallel group (distributed/): its model holds its heads, its KV cache their
        blocks; every rank runs the same steps and samples the same ids from the all-gathered logits."""
        self.config = config
        self.tp = tp
        self.device = device
        self.profiler = RankProfiler(config.profiler_config, tp.rank, device)   # --profiler-config (profiler.py)
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        start = time.perf_counter()
        self.model = load_model(config.model, hf_config, dtype, device, config.load_format, config.quantization,
                                tp, max_model_len)
        self.load_seconds = time.perf_counter() - start
        self.lora = None   # LoRA adapters: slots and host copies (lora/manager.py); None: off, the model untouched
        if config.enable_lora:
            from pagedllm.lora.manager import LoRAManager
            self.lora = LoRAManager(self.model, config.max_loras, config.max_lora_rank, config.max_cpu_loras, device,
                                    config.lora_dtype, config.lora_target_modules)
        if device.type == "cuda":   # steps of a few tokens (after LoRA: wrapped linears keep the unfused code)
            use_small_m(self.model, TARGET_SMALL_M_OPS)
        self.num_layers, self.num_kv_heads, self.head_dim = model_dims(hf_config, tp)   # this rank's KV heads
        self.dtype = dtype
        self.kv_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, dtype)   # the draft's KV stays in dtype
        self.sampler = Sampler()
        self.generator = torch.Generator(device).manual_seed(config.seed)   # requests without a seed
        self.states: dict[str, RunnerRequestState] = {}
        self.constrained: set[str] = set()   # requests with structured_outputs: their steps sample deferred
        self._sampling_key: tuple[str, ...] | None = None
        self._sampling_cache: SamplingMetadata | None = None
        self.penalties = PenaltyTable(hf_config.vocab_size, device)   # token counts of penalised requests
        self.tables = BlockTables(cdiv(max_model_len, self.block_size))
        max_reqs = config.max_num_seqs
        shared_rows_per_item = 0
        if device.type == "cuda" and not config.disable_cascade_attn and not _cascade_blocked(self.model):
            # the Triton backend reads segments many decode rows share once for all (attention/shared_prefix.py)
            from pagedllm.attention.triton_backend import shared_rows_per_item as rows_per_item
            q_heads = hf_config.num_attention_heads // tp.size   # per KV head of this rank
            shared_rows_per_item = rows_per_item(dtype, q_heads // self.num_kv_heads)
        # A verify step's proposals are rows of their own (_one_token_rows): at most max_step_tokens more
        max_rows = max_reqs + (config.speculative.max_step_tokens if config.speculative else 0)
        self.buffers = InputBuffers(max(config.max_num_batched_tokens, max_rows), max_rows,
                                    cdiv(max_model_len, self.block_size), device, shared_rows_per_item)
        if self.lora is not None:   # its step buffer is as large as the largest step (graphs keep its address)
            self.lora.reserve(self.buffers.input_ids.shape[0])
        # Two, used by alternate steps: step N+1's copy is queued before step N's ids are read.
        self.sampled_host = [torch.zeros(max_reqs, dtype=torch.int64, pin_memory=device.type == "cuda")
                             for _ in range(2)]
        self._num_launched = 0
        # The last launched step's sampled ids on the device, and each sampling request's row in them.
        self._in_flight: dict[str, int] = {}
        self._in_flight_ids: torch.Tensor | None = None
        self.spec_rates = config.speculative and config.speculative.conditional_rates()   # synthetic mode
        self.draft = None   # speculative decoding's draft model: loaded before memory is profiled
        if config.speculative is not None and config.speculative.method == "draft_model":
            self.draft = DraftModel(config, hf_config, device, dtype, max_model_len, tp)
        self.graphs = None
        if device.type == "cuda" and not config.enforce_eager and not _graphs_blocked(self.model, device):
            mixed_top = min(config.max_num_batched_tokens, mixed_graph_token_cap(_num_layer_params(self.model)))
            self.graphs = CudaGraphs(capture_sizes(max_reqs), mixed_capture_sizes(mixed_top),
                                     shared=shared_rows_per_item > 0, lora=self.lora is not None)

        block_bytes = bytes_per_block(self.num_layers, self.block_size, self.num_kv_heads, self.head_dim,
                                      self.kv_dtype)
        profiled = None
        if device.type == "cuda" and config.num_gpu_blocks_override is None and config.kv_cache_memory is None:
            scratch = copy_scratch_bytes(block_bytes, self.num_layers) if config.kv_tiers_enabled else 0
            profiled = profile_free_kv_bytes(self._run_largest_step, config.gpu_memory_utilization, device, scratch)
        # A block holds the draft model's KV of its tokens too
        draft_bytes = self.draft.block_bytes if self.draft is not None else 0
        # every rank the same count: the scheduler's block ids index each rank's cache
        self.num_blocks = tp.min_int(determine_num_blocks(config, max_model_len, block_bytes + draft_bytes, profiled))
        check_asked_size_fits(config, self.num_blocks, block_bytes + draft_bytes, device)
        self.kv_caches = allocate_kv_caches(self.num_layers, self.num_blocks, self.block_size,
                                            self.num_kv_heads, self.head_dim, self.kv_dtype, device)
        logger.info("KV cache: %d blocks of %d tokens (%s, %.2f GiB); %.1fx concurrency at max_model_len %d",
                    self.num_blocks, self.block_size, str(self.kv_dtype)[6:],
                    self.num_blocks * block_bytes / 2**30,
                    self.num_blocks * self.block_size / max_model_len, max_model_len)
        # CPU pool and disk tier below the KV cache (None: preemption recomputes, no CPU tier)
        self.kv_offload = KVOffload(config, hf_config, self.kv_caches, block_bytes, dtype, tp) \
            if config.kv_tiers_enabled else None
        if device.type == "cuda":
            self._prebuild_cudnn_plans(hf_config)
        if self.graphs is not None:
            self.buffers.fill_padding()
            if self.lora is not None:   # every token base while capturing: the kernels read and write nothing
                self.lora.clear_step()
            self.graphs.capture(self._graph_forward)
            if self.lora is not None:
                self.lora.clear_step()
        if self.draft is not None:
            self.draft.allocate(self.num_blocks)
        self.kv_window = _kv_window(self.model, self.draft)   # the scheduler frees blocks before it

    # ---- requests ----------------------------------------------------------------------------------------
    def drop_request(self, req_id: str):
        """A request ended before a step told the runner, and its id is used again (EngineCore.add_request takes
        its end out of the next step's finished ids): its state goes now, not the new one's with that step."""
        self._drop(req_id)
        self._sampling_key = self._sampling_cache = None   # keyed by ids: it holds the old one's params

    def add_lora_request(self, req_id: str, lora_request):
        """The request runs under this adapter: loaded now if new (a bad one raises here), held until it ends."""
        if self.lora is None:
            raise ValueError("a lora_request needs enable_lora=True (--enable-lora)")
        self.lora.acquire(req_id, lora_request)

    def clear_kv_disk(self):
        """reset_prefix_cache: this rank's block files of the disk tier are deleted (after its queued writes)."""
        if self.kv_offload is not None:
            self.kv_offload.clear_disk()

    def profile(self, is_start: bool, prefix: str | None = None):
        """vLLM's worker profile(): this rank's torch profiler starts or stops (its trace file written)."""
        if is_start:
            self.profiler.start(prefix)
        else:
            self.profiler.stop()

    def reset_after_failed_step(self):
        """A launched step raised. Its requests are failed; the step before it is read next, so no input
        id of a later step is taken from the device, and the sampling metadata is rebuilt."""
        self._in_flight = {}
        self._sampling_key = self._sampling_cache = None
        if self.draft is not None:
            self.draft.pre = None

    # ---- one step ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute_async(self, sched: SchedulerOutput) -> "PendingOutput":
        with self.profiler.step(sched):   # nothing unless a profile is started
            return self._execute_async(sched)

    def _execute_async(self, sched: SchedulerOutput) -> "PendingOutput":
        # Block copies between the KV tiers first, queued before the forward that reads the blocks: a
        # failure of the per-request work below cannot leave a preempted request's swap-out undone.
        transfer = self.kv_offload.execute(sched.kv_transfers) if self.kv_offload is not None else None
        if self.kv_offload is None and sched.kv_transfers.block_copies:   # forks' partial blocks (else in execute)
            copy_blocks(self.kv_caches, sched.kv_transfers.block_copies)
        self._update_states(sched)
        if sched.is_empty:
            self._in_flight = {}
            return PendingOutput(ModelRunnerOutput(kv_transfer=transfer), [])
        reqs = [self.states[req_id] for req_id in sched.num_scheduled_tokens]
        spec = sched.spec_token_ids   # proposals: inputs after each row's last token (a draft's filled below)
        if self.draft is not None and not spec:
            self.draft.pre = None   # a pre-pass serves only the step right after its verify
        step_rows, query_lens = reqs, list(sched.num_scheduled_tokens.values())
        if spec:
            step_rows, query_lens = _one_token_rows(reqs, query_lens, spec)
        graph = self._graph_key(sched, len(step_rows))
        pad_tokens, pad_rows = (None, None) if graph is None else (graph[0], self._graph_rows(*graph))
        # Shared decode segments: eager steps, and decode graphs (each size has a graph with them)
        share_grid = None if graph is None else max_items(pad_rows)
        verify = proposals = None
        if spec:   # a synchronous step: every input id is on the host, nothing is taken from the device
            verify = VerifyLayout.build(reqs, spec, list(accumulate(sched.num_scheduled_tokens.values(), initial=0)))
            # A draft model's passes first: the device runs them while the host builds the target's inputs
            # (H100, W5: the build took 0.63 ms a step, the device idle behind it)
            proposals = self._proposals(verify, spec, reqs, sched)
        for req_id, ids in spec.items():
            self.states[req_id].token_ids.extend(ids)
        try:
            inputs = self.buffers.build(step_rows, query_lens, self.tables,
                                        self.block_size, pad_tokens=pad_tokens, pad_rows=pad_rows,
                                        max_seq_len_bound=None if graph is None else self.max_model_len,
                                        in_flight=self._in_flight, in_flight_ids=self._in_flight_ids,
                                        share=graph is None or not graph[1], share_grid=share_grid)
        finally:
            for req_id, ids in spec.items():
                del self.states[req_id].token_ids[-len(ids):]
        # Rows that sample one token (a verified request's last one-token row samples through the verify below)
        sample_rows = [i for i in inputs.sample_rows if step_rows[i].req_id not in spec] if spec else inputs.sample_rows
        rows = [step_rows[i] for i in sample_rows]
        draft_ids = None
        if spec:   # n-gram proposals were in the host ids the build wrote; a draft model's are written now
            draft_ids = proposals if self.draft is None else self._write_proposals(verify, proposals)
        prev_in_flight, self._in_flight = self._in_flight, {r.req_id: j for j, r in enumerate(rows)}
        # Sampling metadata first: its small host -> device copies then need not wait for the forward.
        meta = self._sampling_metadata(rows, sched.num_scheduled_tokens, prev_in_flight) if rows else None
        # a graph's padded tokens too: inputs.input_ids has its size. A verify's one-token rows (RowViews) carry
        # their request's id: its last token and every proposal run under its adapter
        if self.lora is not None:
            self.lora.prepare_step([r.req_id for r in step_rows], query_lens, inputs.input_ids.shape[0])
        if graph is not None:
            hidden = self.graphs.replay(*graph, inputs.attn_metadata.shared is not None,
                                        self.lora is not None and bool(self.lora.state.active_slots))
        else:
            with set_forward_context(inputs.attn_metadata, self.kv_caches):
                hidden = self.model(inputs.input_ids, inputs.positions)
        out = ModelRunnerOutput(kv_transfer=transfer)
        if inputs.prompt_lp_rows:
            self._prompt_logprobs(hidden, inputs, step_rows, out)
        pending = PendingOutput(out, rows)
        if verify is not None:
            qsl = inputs.attn_metadata.query_start_loc_cpu
            index = [qsl[i + 1] - 1 for i in sample_rows] + verify.logits_index
            all_logits = self.model.compute_logits(hidden[to_device(index, torch.int64, self.device)])
            res = self._verify(pending, verify, all_logits[len(rows):], draft_ids)
            if self._prepass_due(verify, reqs):
                self.draft.prepass(verify.rows, verify.num_spec, self.tables, res.output_token_ids, res.num_emitted)
            if not rows:
                return pending
            logits = all_logits[:len(rows)]
        elif not rows:
            return pending
        else:
            logits = self.model.compute_logits(hidden[inputs.sample_token_index])
        if self.constrained and any(r.req_id in self.constrained for r in rows):
            # Its bitmask needs the tokens of the step in flight: the engine core applies that step, then
            # sample_constrained() finishes this one while the device runs its forward.
            pending.deferred = (logits, meta)
            if self.device.type == "cuda":   # lets the engine tell whether the bitmask fill was hidden
                pending.forward_done = torch.cuda.Event()
                pending.forward_done.record()
            return pending
        return self._sample(pending, logits, meta)

    @torch.inference_mode()
    def sample_constrained(self, pending: "PendingOutput", bitmask: torch.Tensor, mask_rows: list[int]):
        """Samples a deferred step: host bitmask rows `mask_rows` (the step's sampled rows under a live
        grammar) are copied over and applied to those rows' logits in one kernel, then the sampler runs."""
        logits, meta = pending.deferred
        pending.deferred = None
        if mask_rows:
            apply_bitmask(logits, bitmask[:max(mask_rows) + 1], mask_rows)
        self._sample(pending, logits, meta)

    def _sample(self, pending: "PendingOutput", logits: torch.Tensor, meta: SamplingMetadata) -> "PendingOutput":
        rows = pending.rows
        result = self.sampler(logits, meta, self.generator)
        self._in_flight_ids = result.sampled_token_ids
        if meta.processors is not None and meta.processors.penalties is not None:
            penalties = meta.processors.penalties   # the next step's penalties count these tokens
            self.penalties.record(penalties.slots, result.sampled_token_ids.index_select(0, penalties.rows))
        self._num_launched += 1
        host = self.sampled_host[self._num_launched % 2][:len(rows)]
        host.copy_(result.sampled_token_ids, non_blocking=True)   # the one device -> host copy of the step
        logprobs = None
        if result.logprobs is not None:   # copied now too: a blocking copy in result() would wait for N+1
            logprobs = tuple(_to_host_async(t) for t in (result.logprob_token_ids, result.logprobs,
                                                         result.sampled_token_ranks))
        pending.sampled_host, pending.logprobs_host = host, logprobs
        if self.device.type == "cuda":
            pending.event = torch.cuda.Event()
            pending.event.record()
        return pending

    def _proposals(self, verify: VerifyLayout, spec: dict[str, list[int]], reqs: list[RunnerRequestState],
                   sched: SchedulerOutput) -> torch.Tensor:
        """The step's proposals on the device: n-gram's flat (sum s); a draft model's (R, max s), proposed now,
        before the target's forward in the same stream."""
        if self.draft is None:
            return to_device([t for r in verify.rows for t in spec[r.req_id]], torch.int64, self.device)
        catch_up = [(r, r.num_computed_tokens + sched.num_scheduled_tokens[r.req_id]) for r in reqs
                    if r.req_id not in spec and sched.num_scheduled_tokens[r.req_id] > 1]   # prompt chunks
        return self.draft.propose(verify.rows, verify.num_spec, catch_up, self.tables)

    def _write_proposals(self, verify: VerifyLayout, proposals: torch.Tensor) -> torch.Tensor:
        """A draft model's proposals, flat (sum s), written into the step's input ids (after the build's copy
        in stream order)."""
        if all(s == proposals.shape[1] for s in verify.num_spec):   # every row all its columns: no gather
            flat = proposals.reshape(-1)
        else:
            rows = [i for i, s in enumerate(verify.num_spec) for _ in range(s)]
            cols = [j for s in verify.num_spec for j in range(s)]
            flat = proposals[to_device(rows, torch.int64, self.device), to_device(cols, torch.int64, self.device)]
        self.buffers.input_ids.index_copy_(0, to_device(verify.draft_slots, torch.int64, self.device), flat)
        return flat

    def _verify(self, pending: "PendingOutput", verify: VerifyLayout, logits: torch.Tensor, draft_ids: torch.Tensor):
        """Rejection sampling of the speculating rows; their results are copied to the host with the step's.
        Their metadata has no processors or bans (spec_decode/speculator.py: such rows do not speculate); it is
        each row's as of its first position (one token scheduled: the one after its last computed token)."""
        params = [r.params for r in verify.rows]
        meta = self._sampling_metadata(verify.rows, dict.fromkeys((r.req_id for r in verify.rows), 1), {})
        res = rejection_sample(logits, verify.num_spec, draft_ids, meta, self.generator, self.spec_rates,
                               self._position_metadata(verify))
        logprobs = None
        num_logprobs = [p.logprobs for p in params if p.logprobs is not None]
        if num_logprobs:
            per_position = [p for p, s in zip(params, verify.num_spec) for _ in range(s + 1)]
            chosen = chosen_logprob_ids(per_position, max(num_logprobs), self.device)
            logprobs = tuple(_to_host_async(t) for t in position_logprobs(
                logits, res.output_token_ids, verify.num_spec, max(num_logprobs), chosen))
        pending.verify = VerifyResult(verify, _to_host_async(res.output_token_ids), _to_host_async(res.num_emitted),
                                      logprobs, self.draft.valid if self.draft is not None else None)
        if self.device.type == "cuda":   # the plain rows' sampling, if any, records a later one
            pending.event = torch.cuda.Event()
            pending.event.record()
        return res

    def _position_metadata(self, verify: VerifyLayout) -> SamplingMetadata | None:
        """With seeded sampled rows in a verify: metadata of each position, with its row's parameters and the
        seed of its token's output index (position 0 samples the output after the last computed token), so the
        rejection sampler draws what plain sampling would."""
        if all(r.params.seed is None or r.params.greedy for r in verify.rows):
            return None
        params, seeds = [], []
        for r, s in zip(verify.rows, verify.num_spec):
            first = r.num_computed_tokens + 1 - r.num_prompt_tokens
            params += [r.params] * (s + 1)
            seeds += [None if r.params.seed is None else position_seed(r.params.seed, first + j) for j in range(s + 1)]
        return SamplingMetadata.build(params, seeds, [[] for _ in params], self.device)

    def _prepass_due(self, verify: VerifyLayout, reqs: list[RunnerRequestState]) -> bool:
        """The draft's next passes go behind this verify (DraftModel.prepass) when every request of the step
        speculated the full k, so the next step likely does again; from the draft's CUDA graphs only (an eager
        pass would need the lengths on the host, and on a CPU nothing runs while the host works, so passes that
        the next step cannot use would only cost: tests turn PREPASS_ON_CPU on)."""
        return (self.draft is not None and len(verify.rows) == len(reqs)
                and all(s == self.config.speculative.num_speculative_tokens for s in verify.num_spec)
                and (self.draft.graphs is not None or (self.device.type == "cpu" and PREPASS_ON_CPU)))

    def _graph_key(self, sched: SchedulerOutput, num_reqs: int) -> tuple[int, bool] | None:
        """(padded num_tokens, mixed) of the graph this step replays; None: eager."""
        if self.graphs is None:
            return None
        mixed = sched.total_num_scheduled_tokens != num_reqs    # decode-only: every request one token
        if mixed and num_reqs > self.config.max_num_seqs:
            return None    # more rows than mixed graphs have: a verify step's one-token rows with prompt chunks
        size = self.graphs.padded_size(sched.total_num_scheduled_tokens, mixed)
        return None if size is None else (size, mixed)

    def _graph_rows(self, num_tokens: int, mixed: bool) -> int:
        """Rows of a graph: every row the runner has for mixed steps, one a token for decode steps."""
        return self.config.max_num_seqs if mixed else num_tokens

    def _update_states(self, sched: SchedulerOutput):
        for req_id in sched.finished_req_ids:
            self._drop(req_id)
        for new in sched.new_reqs:
            if self.draft is not None:   # new, or resumed: its blocks hold no draft KV of it
                self.draft.reset(new.req_id)
            state = self.states.get(new.req_id)
            if state is None:
                self.states[new.req_id] = RunnerRequestState(
                    new.req_id, list(new.token_ids), new.num_prompt_tokens, new.sampling_params,
                    self.tables.add(new.block_ids), len(new.block_ids), new.num_computed_tokens)
                if new.sampling_params.structured_outputs is not None:
                    self.constrained.add(new.req_id)
            else:   # resumed after preemption: same prompt logprobs, new blocks
                state.token_ids = list(new.token_ids)
                self.tables.set(state.row, 0, new.block_ids)
                state.num_blocks = len(new.block_ids)
                state.num_computed_tokens = new.num_computed_tokens
        for cached in sched.cached_reqs:
            state = self.states[cached.req_id]
            if cached.new_block_ids:
                self.tables.set(state.row, state.num_blocks, cached.new_block_ids)
                state.num_blocks += len(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    def _drop(self, req_id: str):
        """A request ended: everything the runner holds for it."""
        if self.lora is not None:
            self.lora.release(req_id)
        if self.draft is not None:
            self.draft.forget(req_id)
        state = self.states.pop(req_id, None)
        if state is not None:
            self.tables.release(state.row)
            self.penalties.release(req_id)
            self.constrained.discard(req_id)

    def _sampling_metadata(self, rows: list[RunnerRequestState], num_scheduled: dict[str, int],
                           prev_in_flight: dict[str, int]) -> SamplingMetadata:
        """Rebuilt only when the rows change: consecutive decode steps usually sample the same requests.
        Rows under min_tokens ban ids for a number of steps, seeded rows draw from the index of the token they
        sample, and rows with multi-token bad words match the output's tail, so their metadata is never reused.
        Penalties read their counts live from the table."""
        key = tuple(r.req_id for r in rows)
        if key == self._sampling_key:
            return self._sampling_cache
        # The index of the output sampled now (its input may still be in flight: not in token_ids yet).
        index = [r.num_computed_tokens + num_scheduled[r.req_id] - r.num_prompt_tokens for r in rows]
        banned = [list(r.params.min_tokens_banned_ids) if i < r.params.min_tokens else []
                  for r, i in zip(rows, index)]
        seeds = [None if r.params.seed is None else position_seed(r.params.seed, i) for r, i in zip(rows, index)]
        params = [r.params for r in rows]
        processors = None
        if any(uses_processors(p) for p in params):
            processors = build_logits_processors(params, self._penalties(rows), self._recent_outputs(
                rows, num_scheduled, prev_in_flight), self._in_flight_ids, self.device,
                self._spent_budgets(rows, num_scheduled, prev_in_flight))
        meta = SamplingMetadata.build(params, seeds, banned, self.device, processors)
        reusable = (not meta.seeds and not any(p.min_tokens or p.thinking_token_budget is not None for p in params)
                    and (processors is None or processors.reusable))
        self._sampling_key, self._sampling_cache = (key, meta) if reusable else (None, None)
        return meta

    @staticmethod
    def _spent_budgets(rows: list[RunnerRequestState], num_scheduled: dict[str, int],
                       prev_in_flight: dict[str, int]) -> list[tuple[int, int | None, bool]]:
        """(row, its in-flight token's index or None, whether the tokens on the host spend its budget) of the rows
        whose thinking_token_budget may be spent at the token sampled now: the open reasoning block holds budget
        tokens. With a token still in flight the device decides (logits_processors._forced): that token may end
        the block, or open one that a budget of 0 ends at once."""
        spent = []
        for i, r in enumerate(rows):
            budget = r.params.thinking_token_budget
            if budget is None:
                continue
            now = r.num_computed_tokens + num_scheduled[r.req_id]   # the index of the token sampled now
            in_flight = prev_in_flight[r.req_id] if now > len(r.token_ids) else None
            opened = r.open_reasoning()
            on_host = opened is not None and now - opened >= budget
            if on_host or (in_flight is not None and budget == 0 and r.params.reasoning_start_token_id is not None):
                spent.append((i, in_flight, on_host))
        return spent

    def _penalties(self, rows: list[RunnerRequestState]) -> Penalties | None:
        slots = [self.penalties.slot(r.req_id, r.token_ids, r.num_prompt_tokens) if r.params.uses_penalties
                 else None for r in rows]
        return Penalties.build(self.penalties, [r.params for r in rows], slots, self.device)

    @staticmethod
    def _recent_outputs(rows: list[RunnerRequestState], num_scheduled: dict[str, int],
                        prev_in_flight: dict[str, int]) -> list[tuple[list[int], int | None] | None]:
        """For rows with multi-token bad words: (their last known output tokens, the row of their in-flight
        token in the last step's sampled ids, or None when every output token is on the host)."""
        out = []
        for r in rows:
            if not any(len(w) > 1 for w in r.params.bad_words_token_ids):
                out.append(None)
                continue
            n = max(len(w) for w in r.params.bad_words_token_ids)
            in_flight = r.num_computed_tokens + num_scheduled[r.req_id] > len(r.token_ids)
            known = r.token_ids[max(r.num_prompt_tokens, len(r.token_ids) - n):]
            out.append((known, prev_in_flight[r.req_id] if in_flight else None))
        return out

    def _prompt_logprobs(self, hidden: torch.Tensor, inputs: StepInputs, reqs: list[RunnerRequestState],
                         out: ModelRunnerOutput):
        qsl = inputs.attn_metadata.query_start_loc_cpu
        for row, start, count in inputs.prompt_lp_rows:
            r = reqs[row]
            first = qsl[row] + start - r.num_computed_tokens
            # A few rows of float32 logits at a time: a whole chunk's (16,384 x 128,256) would be 8.4 GB, twice
            # with the log-softmax, which the start-up profile does not reserve.
            for i in range(0, count, PROMPT_LOGPROBS_ROWS):
                n = min(PROMPT_LOGPROBS_ROWS, count - i)
                logits = self.model.compute_logits(hidden[first + i:first + i + n])
                targets = to_device(r.token_ids[start + i + 1:start + i + 1 + n], torch.int64, logits.device)
                r.prompt_logprobs.extend(token_logprobs(logits, targets, r.params.prompt_logprobs))
            if len(r.prompt_logprobs) == r.num_prompt_tokens - 1:
                out.prompt_logprobs[r.req_id] = r.prompt_logprobs
                r.prompt_logprobs_sent = True

    # ---- start-up: memory profile, cuDNN plans and CUDA graphs --------------------------------------------
    def _prebuild_cudnn_plans(self, hf_config) -> None:
        """Long prompt rows go to cuDNN (attention/cudnn_prefill.py), one call a row of a plan that serves every
        row up to the engine's limits: built now, so that no step pays for it."""
        from pagedllm.attention import cudnn_prefill
        cudnn_prefill.prebuild_plans(hf_config.num_attention_heads // self.tp.size, self.num_kv_heads,
                                     self.head_dim, self.dtype, self.device,
                                     self.config.max_num_batched_tokens, self.max_model_len)

    @torch.inference_mode()
    def _run_largest_step(self) -> int:
        """One step of max_num_batched_tokens fresh prompt tokens over as many requests as can run, all of
        them sampling with top-k, top-p and penalties (the sampler's largest buffers), on a throwaway KV cache."""
        num_tokens = min(self.config.max_num_batched_tokens, self.config.max_num_seqs * self.max_model_len)
        num_reqs = max(cdiv(num_tokens, self.max_model_len), min(self.config.max_num_seqs, num_tokens))
        lens = [num_tokens // num_reqs + (i < num_tokens % num_reqs) for i in range(num_reqs)]
        tables = BlockTables(cdiv(self.max_model_len, self.block_size), num_reqs)
        reqs, next_block = [], 0
        for i, n in enumerate(lens):
            blocks = list(range(next_block, next_block + cdiv(n, self.block_size)))
            next_block += len(blocks)
            reqs.append(RunnerRequestState(f"profile-{i}", [0] * n, n, SamplingParams(), tables.add(blocks),
                                           len(blocks), 0, None))
        kv_caches = allocate_kv_caches(self.num_layers, next_block, self.block_size, self.num_kv_heads,
                                       self.head_dim, self.kv_dtype, self.device)
        inputs = self.buffers.build(reqs, lens, tables, self.block_size)
        if self.lora is not None:   # the LoRA products' activations count too
            self.lora.profile_step(num_tokens)
        with set_forward_context(inputs.attn_metadata, kv_caches):
            hidden = self.model(inputs.input_ids, inputs.positions)
        if self.lora is not None:
            self.lora.clear_step()
        logits = self.model.compute_logits(hidden[inputs.sample_token_index])
        most = self.config.logprobs_bound(self.penalties.vocab_size)   # the widest logprobs a request may ask
        params = [SamplingParams(temperature=1.0, top_k=50, top_p=0.9, logprobs=most,
                                 repetition_penalty=1.1)] * num_reqs
        # A throwaway penalty table as large as these rows' will be: its room stays free of KV blocks.
        table = PenaltyTable(self.penalties.vocab_size, self.device)
        slots = [table.slot(r.req_id, r.token_ids, r.num_prompt_tokens) for r in reqs]
        penalties = Penalties.build(table, params, slots, self.device)
        processors = build_logits_processors(params, penalties, [None] * num_reqs, None, self.device)
        meta = SamplingMetadata.build(params, [None] * num_reqs, [[]] * num_reqs, self.device, processors)
        self.sampler(logits, meta, self.generator)
        return sum(kv.numel() * kv.element_size() for kv in kv_caches)

    @torch.inference_mode()
    def _graph_forward(self, num_tokens: int, mixed: bool, shared: bool, lora: bool) -> torch.Tensor:
        """The model on the persistent inputs, shaped as a padded step of num_tokens; lora: with the LoRA
        kernels (every slot present, every token base while capturing: they read and write nothing)."""
        if self.lora is not None:
            self.lora.capture_slots(lora)
        b = self.buffers
        meta = b.graph_metadata(num_tokens, self._graph_rows(num_tokens, mixed), mixed, self.max_model_len, shared)
        with set_forward_context(meta, self.kv_caches):
            return self.model(b.input_ids[:num_tokens], b.positions[:num_tokens])


@dataclass
class PendingOutput:
    """A launched step: result() waits for its sampled ids and hands them out."""
    out: ModelRunnerOutput
    rows: list[RunnerRequestState]
    sampled_host: torch.Tensor | None = None
    logprobs_host: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None   # ids, logprobs, ranks
    event: torch.cuda.Event | None = None
    deferred: tuple[torch.Tensor, "SamplingMetadata"] | None = None   # logits, metadata: sampled later
    forward_done: torch.cuda.Event | None = None   # a deferred step's forward (CUDA)
    verify: VerifyResult | None = None   # speculating rows' results (speculative decoding)

    def result(self) -> ModelRunnerOutput:
        if not self.rows and self.verify is None:
            return self.out
        if self.event is not None:
            self.event.synchronize()
        if self.verify is not None:
            self.verify.apply(self.out)
            self.verify = None
        if not self.rows:
            return self.out
        sampled, out = self.sampled_host.tolist(), self.out
        lp_ids, lps, ranks = [t.tolist() for t in self.logprobs_host] if self.logprobs_host else (None,) * 3
        for j, (r, token) in enumerate(zip(self.rows, sampled)):
            r.token_ids.append(token)
            out.sampled_token_ids[r.req_id] = [token]
            if r.params.logprobs is not None:
                k = 1 + r.params.logprobs
                out.logprobs[r.req_id] = [TokenLogprobs(lp_ids[j][:k], lps[j][:k], ranks[j])]
        self.rows = []   # hand out once
        return out


def _one_token_rows(reqs: list[RunnerRequestState], query_lens: list[int], spec: dict[str, list[int]]):
    """A verified request's last token and proposals as one-token rows, each seeing the positions up to its
    own (the K/V of all is written before any attention reads): a step of such rows runs the decode
    kernels (split over the context) and decode graphs instead of the prefill kernel."""
    rows, lens = [], []
    for r, q in zip(reqs, query_lens):
        if r.req_id in spec:
            rows += [RowView.of(r, r.num_computed_tokens + j) for j in range(q)]
            lens += [1] * q
        else:
            rows.append(r)
            lens.append(q)
    return rows, lens


def apply_bitmask(logits: torch.Tensor, bitmask_host: torch.Tensor, rows: list[int]):
    """Tokens a grammar forbids get -inf, in the given rows of logits (N, V); bitmask row j is logits row j.
    On CUDA: one non-blocking copy of the bitmask and the rows, then xgrammar's Triton kernel."""
    import xgrammar as xgr
    if logits.is_cuda:
        bitmask = bitmask_host.to(logits.device, non_blocking=True)
        indices = to_device(rows, torch.int32, logits.device)
        xgr.apply_token_bitmask_inplace(logits, bitmask, indices=indices, backend="triton")
    else:   # xgrammar's C++ CPU kernel takes float32 only
        xgr.apply_token_bitmask_inplace(logits, bitmask_host, indices=rows,
                                        backend="cpu" if logits.dtype == torch.float32 else "torch_native")


def _cascade_blocked(model: torch.nn.Module) -> bool:
    """True (and said in the log) where a layer attends within a sliding window or soft-caps its scores: the
    shared-prefix plan (attention/shared_prefix.py) is one a step for every layer, made for full, uncapped attention
    (vLLM also runs no cascade attention with a sliding window)."""
    masked = [m for m in model.modules() if isinstance(m, Attention) and m.masking]
    if masked:
        logger.info("cascade attention off: %d attention layers slide or soft-cap (as --disable-cascade-attn)",
                    len(masked))
    return bool(masked)


def _kv_window(model: torch.nn.Module, draft) -> int | None:
    """The window every attention layer attends within (the widest), or None where some layer sees all its
    context. Not with a draft model: its catch-up passes write its KV at positions the target has moved past."""
    windows = [m.sliding_window for m in model.modules() if isinstance(m, Attention)]
    if draft is not None or not windows or None in windows:
        return None
    logger.info("every attention layer slides within at most %d tokens: a request's blocks before it are freed",
                max(windows))
    return max(windows)


def _graphs_blocked(model: torch.nn.Module, device: torch.device) -> bool:
    """True (and said in the log) where the model's steps cannot be captured: it runs eager, as enforce_eager."""
    blocker = cuda_graph_blocker(model, device)
    if blocker:
        logger.warning("CUDA graphs off (running as with enforce_eager): %s", blocker)
    return blocker is not None


def _num_layer_params(model: torch.nn.Module) -> int:
    """Parameters every token multiplies through: all but the embedding table (the logits are per sampled row),
    and of a mixture of experts' weights the top_k of E a token is routed through."""
    total = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name
                and "lm_head" not in name)
    unused = sum((1 - m.active_fraction()) * sum(p.numel() for p in m.experts.parameters())
                 for m in model.modules() if isinstance(m, SparseMoeBlock))
    return int(total - unused)


def _to_host_async(t: torch.Tensor) -> torch.Tensor:
    if not t.is_cuda:
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, k: int) -> list[TokenLogprobs]:
    """Logprob and rank of given tokens plus the top-k, from raw logits (N, V)."""
    ids, lps, ranks = gather_logprobs(torch.log_softmax(logits.float(), dim=-1), token_ids, k)
    return [TokenLogprobs(i, lp, rank) for i, lp, rank in zip(ids.tolist(), lps.tolist(), ranks.tolist())]
