"""Engine: requests in, one step at a time, RequestOutputs out."""
import dataclasses
import logging
import numbers
import time
from pathlib import Path

import torch
from transformers import AutoConfig

from pagedllm.config import EngineConfig
from pagedllm.core.kv_cache_manager import KVCacheManager, cdiv
from pagedllm.core.messages import EngineCoreOutput
from pagedllm.core.offload import KVOffloadManager
from pagedllm.core.scheduler import Scheduler
from pagedllm.engine.output_processor import OutputKind, OutputProcessor, child_request_id
from pagedllm.engine.tokenizer import load_eos_token_ids, load_tokenizer
from pagedllm.metrics import SchedulerStats, StatsLogger
from pagedllm.models import sliding_window
from pagedllm.outputs import RequestOutput
from pagedllm.request import Request, RequestStatus
from pagedllm.runner.model_runner import ModelRunner
from pagedllm.sampling_params import SamplingParams

logger = logging.getLogger("pagedllm")


class Engine:
    def __init__(self, config: EngineConfig):
        start = time.perf_counter()
        self.config = config
        self.hf_config = _load_hf_config(config.model)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.hf_config, self.device)
        self.max_model_len = _resolve_max_model_len(config.max_model_len, self.hf_config)
        self.vocab_size = self.hf_config.vocab_size
        self.tokenizer = load_tokenizer(config.tokenizer or config.model)
        self.eos_token_ids = load_eos_token_ids(config.model, self.tokenizer)
        torch.manual_seed(config.seed)
        self.runner = ModelRunner(config, self.hf_config, self.device, self.dtype, self.max_model_len)
        offload = self.runner.kv_offload and KVOffloadManager(
            config.block_size, config.preemption_mode, config.enable_prefix_caching, self.runner.kv_offload.sizes)
        self.kv_cache_manager = KVCacheManager(self.runner.num_blocks, config.block_size,
                                               offload and offload.on_gpu_evict)
        self.scheduler = Scheduler(self.kv_cache_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.max_model_len, offload)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.stats_logger = StatsLogger(config.log_stats_interval)
        self._unprocessed: list[EngineCoreOutput] = []   # the last step's results, processed in the next
        self.startup_seconds = time.perf_counter() - start
        logger.info("engine ready in %.2f s: %s on %s (%s), max_model_len %d", self.startup_seconds,
                    Path(config.model).name, self.device, str(self.dtype).removeprefix("torch."),
                    self.max_model_len)

    # ---- requests ----------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    kind: OutputKind = OutputKind.FINAL, arrival_time: float | None = None):
        """Validates and queues a request; a request that can never run is a ValueError here."""
        child_ids = [child_request_id(request_id, i, params.n) for i in range(params.n)]
        if request_id in self.output_processor.parents or any(c in self.scheduler.requests for c in child_ids):
            raise ValueError(f"request_id {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        prompt_ids = self.tokenizer.encode(prompt) if text is not None else _token_ids(prompt)
        self._validate_prompt(prompt_ids)
        params.validate_vocab(self.vocab_size)
        max_tokens = self._resolve_max_tokens(len(prompt_ids), params)
        params = dataclasses.replace(params, all_stop_token_ids=set(params.stop_token_ids) |
                                     (set() if params.ignore_eos else self.eos_token_ids))
        arrival_time = time.time() if arrival_time is None else arrival_time
        self.output_processor.add_request(request_id, text, prompt_ids, params, kind, arrival_time)
        # Prefix caching off: a salt keeps other requests out of this one's blocks, but not its n siblings.
        salt = None if self.config.enable_prefix_caching else request_id
        for i, child_id in enumerate(child_ids):
            # Siblings share the prompt's blocks through the block hashes; seeded siblings differ by index.
            child_params = params if params.n == 1 else dataclasses.replace(
                params, n=1, seed=None if params.seed is None else params.seed + i)
            self.scheduler.add_request(Request(child_id, prompt_ids, child_params, max_tokens,
                                               self.config.block_size, arrival_time, salt))

    def _validate_prompt(self, prompt_ids: list[int]):
        if not prompt_ids:
            raise ValueError("prompt must not be empty")
        bad = [t for t in prompt_ids if not (isinstance(t, int) and 0 <= t < self.vocab_size)]
        if bad:
            raise ValueError(f"prompt_token_ids must be integers in [0, {self.vocab_size}), got {bad[:5]}")

    def _resolve_max_tokens(self, num_prompt: int, params: SamplingParams) -> int:
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - num_prompt
        if num_prompt + max_tokens > self.max_model_len or max_tokens < 1:
            raise ValueError(f"prompt ({num_prompt} tokens) + max_tokens ({params.max_tokens}) must be at most "
                             f"max_model_len ({self.max_model_len})")
        blocks_needed = cdiv(num_prompt + max_tokens, self.config.block_size)
        if blocks_needed > self.runner.num_blocks:
            raise ValueError(f"prompt ({num_prompt} tokens) + max_tokens ({max_tokens}) needs {blocks_needed} "
                             f"KV blocks but the KV cache has only {self.runner.num_blocks}: lower max_tokens "
                             f"or raise kv_cache_memory")
        return max_tokens

    def abort_request(self, request_ids: list[str] | str):
        for request_id in [request_ids] if isinstance(request_ids, str) else request_ids:
            self.scheduler.finish_requests(self.output_processor.child_ids(request_id),
                                           RequestStatus.FINISHED_ABORTED)
            self.output_processor.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self._unprocessed)

    # ---- one step ------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedules and launches step N, then turns step N-1's results into RequestOutputs while the GPU
        runs N. A stop string found there ends its request before N+1 is scheduled; the token N computed
        for it is dropped (update_from_output skips finished requests)."""
        sched_out = self.scheduler.schedule()
        pending = self.runner.execute_async(sched_out)
        outputs, stopped = self.output_processor.process(self._unprocessed)
        self.scheduler.finish_requests(stopped, RequestStatus.FINISHED_STOPPED)
        self._unprocessed = self.scheduler.update_from_output(sched_out, pending.result())
        self.stats_logger.maybe_log(self.get_stats)
        return outputs

    def get_stats(self) -> SchedulerStats:
        return self.scheduler.make_stats()

    def reset_peak_stats(self):
        """Restart the peak KV usage figures of get_stats() (the benchmark calls it after its warm-up)."""
        self.scheduler.kv_peak.reset()


def _token_ids(prompt) -> list:
    """Plain ints (numpy integers accepted); anything else is left for _validate_prompt to reject."""
    return [int(t) if isinstance(t, numbers.Integral) and not isinstance(t, bool) else t for t in prompt]


def _load_hf_config(model: str):
    if not (Path(model) / "config.json").is_file():
        raise FileNotFoundError(f"model directory {model!r} has no config.json (pagedllm loads local HF "
                                f"checkpoints: config.json, *.safetensors and tokenizer files)")
    return AutoConfig.from_pretrained(model)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, hf_config, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cpu":
        return torch.float32
    ckpt = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    ckpt = getattr(torch, ckpt) if isinstance(ckpt, str) else ckpt
    return ckpt if ckpt in (torch.float16, torch.bfloat16) else torch.float16   # as vLLM: fp32 runs in fp16


def _resolve_max_model_len(max_model_len: int | None, hf_config) -> int:
    limit, what = hf_config.max_position_embeddings, "max_position_embeddings"
    window = sliding_window(hf_config)
    if window is not None:   # sliding-window attention is not implemented: stay inside one window
        limit, what = window, "sliding_window (sliding-window attention is not supported beyond it)"
    if max_model_len is None:
        return limit
    if max_model_len > limit:
        raise ValueError(f"max_model_len ({max_model_len}) must be at most the model's {what} ({limit})")
    return max_model_len
