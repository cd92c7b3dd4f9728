"""ModelRunner: turns a SchedulerOutput into one forward pass over the paged KV cache, and samples."""
import logging

import torch

from pagedllm.attention.metadata import set_forward_context
from pagedllm.config import EngineConfig
from pagedllm.core.messages import ModelRunnerOutput, SchedulerOutput, TokenLogprobs
from pagedllm.models import model_dims
from pagedllm.models.loader import load_model
from pagedllm.runner.input_batch import RunnerRequestState, StepInputs, build_step_inputs
from pagedllm.runner.kv_cache import allocate_kv_caches, bytes_per_block, determine_num_blocks
from pagedllm.runner.kv_offload import KVOffload
from pagedllm.sample.sampler import Sampler, SamplingMetadata, gather_logprobs

logger = logging.getLogger("pagedllm")


class ModelRunner:
    def __init__(self, config: EngineConfig, hf_config, device: torch.device, dtype: torch.dtype,
                 max_model_len: int):
        self.config = config
        self.device = device
        self.block_size = config.block_size
        self.model = load_model(config.model, hf_config, dtype, device, config.load_format)
        self.num_layers, self.num_kv_heads, self.head_dim = model_dims(hf_config)
        block_bytes = bytes_per_block(self.num_layers, self.block_size, self.num_kv_heads, self.head_dim, dtype)
        self.num_blocks = determine_num_blocks(config, max_model_len, block_bytes)
        self.kv_caches = allocate_kv_caches(self.num_layers, self.num_blocks, self.block_size,
                                            self.num_kv_heads, self.head_dim, dtype, device)
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB); %.1fx concurrency at max_model_len %d",
                    self.num_blocks, self.block_size, self.num_blocks * block_bytes / 2**20,
                    self.num_blocks * self.block_size / max_model_len, max_model_len)
        # CPU pool and disk tier below the KV cache (None: preemption recomputes, no CPU tier)
        self.kv_offload = KVOffload(config, hf_config, self.kv_caches, block_bytes) \
            if config.kv_tiers_enabled else None
        self.sampler = Sampler()
        self.generator = torch.Generator(device).manual_seed(config.seed)   # requests without a seed
        self.states: dict[str, RunnerRequestState] = {}

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(sched)
        out = ModelRunnerOutput()
        if self.kv_offload is not None:   # block copies between tiers, before the forward reads the blocks
            out.kv_transfer = self.kv_offload.execute(sched.kv_transfers)
        if sched.is_empty:
            return out
        reqs = [self.states[req_id] for req_id in sched.num_scheduled_tokens]
        inputs = build_step_inputs(reqs, list(sched.num_scheduled_tokens.values()), self.block_size,
                                   self.device)
        with set_forward_context(inputs.attn_metadata, self.kv_caches):
            hidden = self.model(inputs.input_ids, inputs.positions)
        if inputs.prompt_lp_rows:
            self._prompt_logprobs(hidden, inputs, reqs, out)
        if inputs.sample_rows:
            self._sample(hidden, inputs, reqs, out)
        return out

    def _update_states(self, sched: SchedulerOutput):
        for req_id in sched.finished_req_ids:
            self.states.pop(req_id, None)
        for new in sched.new_reqs:
            state = self.states.get(new.req_id)
            if state is None:
                self.states[new.req_id] = RunnerRequestState(
                    new.req_id, list(new.token_ids), new.num_prompt_tokens, new.sampling_params,
                    list(new.block_ids), new.num_computed_tokens, self._make_generator(new.sampling_params))
            else:   # resumed after preemption: same generator and prompt logprobs, new blocks
                state.token_ids, state.block_ids = list(new.token_ids), list(new.block_ids)
                state.num_computed_tokens = new.num_computed_tokens
        for cached in sched.cached_reqs:
            state = self.states[cached.req_id]
            state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    def _make_generator(self, params) -> torch.Generator | None:
        if params.seed is None:
            return None
        return torch.Generator(self.device).manual_seed(params.seed)

    def _sample(self, hidden: torch.Tensor, inputs: StepInputs, reqs: list[RunnerRequestState],
                out: ModelRunnerOutput):
        rows = [reqs[i] for i in inputs.sample_rows]
        logits = self.model.compute_logits(hidden[inputs.sample_token_index])
        banned = [list(r.params.all_stop_token_ids) if len(r.token_ids) - r.num_prompt_tokens < r.params.min_tokens
                  else [] for r in rows]
        meta = SamplingMetadata.build([r.params for r in rows], [r.generator for r in rows], banned, self.device)
        result = self.sampler(logits, meta, self.generator)
        sampled = result.sampled_token_ids.tolist()   # the one device -> host copy of the step
        lp_ids = result.logprob_token_ids.tolist() if result.logprob_token_ids is not None else None
        lps = result.logprobs.tolist() if result.logprobs is not None else None
        ranks = result.sampled_token_ranks.tolist() if result.sampled_token_ranks is not None else None
        for j, (r, token) in enumerate(zip(rows, sampled)):
            r.token_ids.append(token)
            out.sampled_token_ids[r.req_id] = token
            if r.params.logprobs is not None:
                k = 1 + r.params.logprobs
                out.logprobs[r.req_id] = TokenLogprobs(lp_ids[j][:k], lps[j][:k], ranks[j])

    def _prompt_logprobs(self, hidden: torch.Tensor, inputs: StepInputs, reqs: list[RunnerRequestState],
                         out: ModelRunnerOutput):
        qsl = inputs.attn_metadata.query_start_loc_cpu
        for row, start, count in inputs.prompt_lp_rows:
            r = reqs[row]
            first = qsl[row] + start - r.num_computed_tokens
            logits = self.model.compute_logits(hidden[first:first + count])
            targets = torch.tensor(r.token_ids[start + 1:start + 1 + count], device=logits.device)
            r.prompt_logprobs.extend(token_logprobs(logits, targets, r.params.prompt_logprobs))
            if len(r.prompt_logprobs) == r.num_prompt_tokens - 1:
                out.prompt_logprobs[r.req_id] = r.prompt_logprobs
                r.prompt_logprobs_sent = True


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, k: int) -> list[TokenLogprobs]:
    """Logprob and rank of given tokens plus the top-k, from raw logits (N, V)."""
    ids, lps, ranks = gather_logprobs(torch.log_softmax(logits.float(), dim=-1), token_ids, k)
    return [TokenLogprobs(i, lp, rank) for i, lp, rank in zip(ids.tolist(), lps.tolist(), ranks.tolist())]
