"""Engine: requests in, one step at a time, RequestOutputs out."""
import json
import logging
import re
import time
from pathlib import Path

import torch
from transformers import AutoConfig

from pagedllm.config import EngineConfig
from pagedllm.engine.core import EngineCore
from pagedllm.engine.generation_config import load_default_sampling_params
from pagedllm.engine.hf_overrides import apply_hf_overrides
from pagedllm.engine.input_processor import InputProcessor, check_arrival_time, check_request_types
from pagedllm.engine.pause import check_mode, check_sleep_level, check_wake_up_tags
from pagedllm.engine.output_processor import OutputKind, OutputProcessor, child_request_id
from pagedllm.engine.resolved_model import ResolvedModel
from pagedllm.engine.tokenization_kwargs import apply_tokenization_kwargs
from pagedllm.engine.tokenizer import load_engine_tokenizer
from pagedllm.engine.vllm_config import ModelConfig, engine_vllm_config
from pagedllm.layers.rotary import rope_parameters
from pagedllm.lora.request import LoRARequest
from pagedllm.metrics import SchedulerStats, StatsLogger
from pagedllm.models import feature_refusal, get_model_class, served_config
from pagedllm.outputs import RequestOutput
from pagedllm.request import RequestStatus
from pagedllm.sampling_params import SamplingParams
from pagedllm.vllm_names import missing

logger = logging.getLogger("pagedllm")


def is_large_gpu(device: torch.device) -> bool:
    """vLLM's test for its larger batch defaults: 70 GiB or more of GPU memory, and not an A100."""
    if device.type != "cuda":
        return False
    props = torch.cuda.get_device_properties(device)
    return props.total_memory >= 70 * 2**30 and "a100" not in props.name.lower()


def resolve_model(config: EngineConfig) -> ResolvedModel:
    hf_config = _load_hf_config(config.model, config.hf_overrides)
    refusal = feature_refusal(hf_config, config.quantization, config.enable_lora)
    if refusal:
        raise ValueError(refusal)
    device = resolve_device(config.device)
    return ResolvedModel(hf_config, device, resolve_dtype(config.dtype, hf_config, device),
                         _resolve_max_model_len(config.max_model_len, hf_config))


class Engine:
    def __init__(self, config: EngineConfig, log_requests: bool = False):
        """log_requests (vLLM's enable_log_requests) as the AsyncLLM's; streamed outputs come every
        config.stream_interval tokens, as vLLM's LLMEngine's (its scheduler_config's)."""
        start = time.perf_counter()
        model = resolve_model(config)
        self.config = config = config.with_batch_defaults(is_large_gpu(model.device), serving=False)
        self.hf_config, self.device, self.dtype = model.hf_config, model.device, model.dtype
        self.max_model_len = model.max_model_len
        self.vocab_size = self.hf_config.vocab_size
        self.tokenizer = load_engine_tokenizer(config)
        self.core = EngineCore(config, self.hf_config, self.device, self.dtype, self.max_model_len)
        self.input_processor = InputProcessor.for_engine(config, self.tokenizer, self.vocab_size, self.max_model_len,
                                                         self.core.runner.num_blocks)
        self.output_processor = OutputProcessor(self.tokenizer, config.stream_interval)
        self.log_requests = log_requests
        self.default_sampling_params = load_default_sampling_params(config.model, config.generation_config,
                                                            config.override_generation_config)
        self.stats_logger = StatsLogger(config.log_stats_interval)
        self._drained: list[RequestOutput] = []   # outputs of steps sleep() ran, for the next step() to return
        self.vllm_config = engine_vllm_config(self)   # vLLM's LLMEngine.vllm_config: read-only views of the above
        self.startup_seconds = time.perf_counter() - start
        logger.info("engine ready in %.2f s: %s on %s (%s), max_model_len %d", self.startup_seconds,
                    Path(config.model).name, self.device, str(self.dtype).removeprefix("torch."),
                    self.max_model_len)

    def __getattr__(self, name: str):   # only for names not found: vLLM's LLMEngine's, said why
        raise missing("Engine", name)

    def get_tokenizer(self):
        """vLLM's LLMEngine.get_tokenizer() (None with skip_tokenizer_init)."""
        return self.tokenizer

    @property
    def model_config(self) -> ModelConfig:
        """vLLM's LLMEngine.model_config: the model, dtype, max_model_len, hf_config... this engine runs with."""
        return self.vllm_config.model_config

    @property
    def runner(self):
        return self.core.runner

    @property
    def kv_cache_manager(self):
        return self.core.kv_cache_manager

    @property
    def scheduler(self):
        return self.core.scheduler

    # ---- requests ----------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int] | dict, params: SamplingParams,
                    arrival_time: float | None = None, lora_request=None, tokenization_kwargs: dict | None = None,
                    trace_headers=None, priority: int = 0, prompt_text: str | None = None, *,
                    output_kind: OutputKind | None = None, cache_salt: str | None = None,
                    kv_parent: str | None = None, hold_kv: bool = False) -> str:
        """Validates and queues a request, vLLM's LLMEngine.add_request (its parameters in its order; returns the
        request_id); a request that can never run is a ValueError here. output_kind: None takes params.output_kind
        (vLLM's: an output every step, CUMULATIVE or DELTA, or FINAL_ONLY's one). priority: lower runs first
        under scheduling_policy "priority" (else only 0 is accepted). tokenization_kwargs: as LLM.generate's;
        trace_headers and prompt_text change nothing, as under vLLM for these prompts (no tracing endpoint is
        built; it takes prompt_text for a prebuilt EngineCoreRequest only). lora_request:
        a LoRARequest (enable_lora); an adapter not on the host is read on a loader thread while steps go on (the
        request waits for it), and a bad one ends the request with finish_reason "error" (LLM.generate checks
        its adapters first, so there it is a ValueError).
        hold_kv: its blocks are kept when it ends (release_kv_holds frees them); kv_parent: a held request
        whose tokens this one's extend, whose KV it forks copy-on-write (core/kv_fork.py; beam search)."""
        check_request_types(request_id, prompt, params)
        check_arrival_time(arrival_time)
        (prompt,), (params,) = apply_tokenization_kwargs(tokenization_kwargs, [prompt], [params], self.tokenizer)
        kind = OutputKind.of(params) if output_kind is None else output_kind
        num_seqs = params.num_sequences
        child_ids = [child_request_id(request_id, i, num_seqs) for i in range(num_seqs)]
        if (request_id in self.output_processor.parents
                or any(c in self.core.scheduler.requests for c in child_ids)):
            raise ValueError(f"request_id {request_id!r} is already in use")
        if lora_request is not None:
            if not isinstance(lora_request, LoRARequest):
                raise TypeError(f"lora_request must be a LoRARequest or None, got {type(lora_request).__name__}")
            if self.core.runner.lora is None:
                raise ValueError("a lora_request needs enable_lora=True (--enable-lora)")
        req = self.input_processor.process(request_id, prompt, params, arrival_time, cache_salt, lora_request,
                                           kv_parent, hold_kv, priority)
        self.output_processor.add_request(request_id, req.prompt, req.prompt_token_ids, req.params, kind,
                                          req.arrival_time, lora_request)
        for core_request in req.core_requests:
            self.core.add_request(core_request)
        if self.log_requests:
            logger.info("Added request %s.", request_id)
        return request_id

    def abort_request(self, request_ids: list[str] | str):
        for request_id in [request_ids] if isinstance(request_ids, str) else request_ids:
            self.core.finish_requests(self.output_processor.child_ids(request_id), RequestStatus.FINISHED_ABORTED)
            self.output_processor.abort(request_id)
            if self.log_requests:
                logger.info("Aborted request %s.", request_id)

    def release_kv_holds(self, request_ids: list[str]):
        """Requests added with hold_kv get no more children: their blocks are freed once those have forked."""
        self.core.release_kv_holds(request_ids)

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests() or bool(self._drained)

    def get_num_unfinished_requests(self) -> int:
        """vLLM's: the sequences added and not yet finished (a request of n > 1 counts n until its sequences end)."""
        return sum(s.finish_reason is None for _, s in self.output_processor.child_to_parent.values())

    # ---- one step ------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """EngineCore.step (launch N+1, apply N), then N's results become RequestOutputs while the device runs
        N+1. A stop string found in N's tokens ends its request before N+2 is scheduled; the token N+1
        computes for it is dropped (update_from_output skips finished requests).

        A request the engine core failed (its data raised there, or its step did; the core logs why)
        finishes here with finish_reason "error" on its sequences; the others are unaffected."""
        done = self.core.step()
        outputs, self._drained = self._drained, []
        if done is not None:
            processed, stopped, _ = self.output_processor.process(done[0])
            outputs += processed
            self.core.finish_requests(stopped, RequestStatus.FINISHED_STOPPED)
        self.stats_logger.maybe_log(self.get_stats)
        return outputs

    # ---- sleep level 0: pausing the scheduler (vLLM's LLMEngine names; engine/pause.py) --------------------
    def sleep(self, level: int = 1, mode: str = "abort"):
        """Level 0: requests added from now on queue and are not scheduled until wake_up(); mode says what
        becomes of those in the engine (abort, wait: their steps run here until they end, keep). The outputs
        of the steps this runs come with the next step(). Levels 1 and 2 are not built (refused)."""
        check_sleep_level(level)
        future = self.core.pause(check_mode(mode), clear_cache=False, sleep_level=level)
        while future is not None and not future.done():
            self._drained = self.step()   # step() returns the earlier drained outputs with its own
        if future is not None:
            future.result()

    def wake_up(self, tags: list[str] | None = None):
        """Resumes scheduling (tags: vLLM's; any of them, or None, resumes: no level 1 or 2 sleep is built)."""
        check_wake_up_tags(tags)
        self.core.resume()

    def is_sleeping(self) -> bool:
        return self.core.is_paused()

    def held_by_pause(self) -> bool:
        """Requests are left, and a pause keeps any step from running them."""
        return not self._drained and self.core.is_paused() and not self.core.has_work()

    # ---- LoRA adapters (vLLM's LLMEngine names; see EngineCore) -------------------------------------------
    def add_lora(self, lora_request) -> bool:
        return self.core.add_lora(lora_request)

    def remove_lora(self, lora_int_id: int) -> bool:
        return self.core.remove_lora(lora_int_id)

    def list_loras(self) -> set[int]:
        return self.core.list_loras()

    def pin_lora(self, lora_int_id: int) -> bool:
        """vLLM's: the loaded adapter is never evicted from the host LRU (max_cpu_loras); remove_lora still
        removes it. A ValueError when it is not loaded."""
        return self.core.pin_lora(lora_int_id)

    def reset_prefix_cache(self) -> bool:
        """See EngineCore.reset_prefix_cache: the GPU prefix cache and the CPU and disk tiers."""
        return self.core.reset_prefix_cache()

    def start_profile(self, profile_prefix: str | None = None):
        """vLLM's: the torch profiler of --profiler-config starts on every rank (RuntimeError without one);
        profile_prefix starts the trace files' names."""
        self.core.profile(True, profile_prefix)

    def stop_profile(self):
        """The profiler stops; each rank writes its trace into the config's torch_profiler_dir."""
        self.core.profile(False)

    def get_stats(self) -> SchedulerStats:
        return self.core.get_stats()

    def shutdown(self):
        """Stops the tensor-parallel worker processes (nothing to do at tensor_parallel_size 1)."""
        self.core.shutdown()

    def reset_peak_stats(self):
        """Restart the peak KV usage figures of get_stats() (the benchmark calls it after its warm-up)."""
        self.core.reset_peak_stats()


def reset_answer(reset: bool, reset_running_requests: bool) -> bool:
    """vLLM's reset_prefix_cache answer (LLM's and AsyncLLM's) from the engine's: False while requests hold KV
    blocks, unless the caller asked to preempt them first, which is not built."""
    if reset or not reset_running_requests:
        return reset
    raise NotImplementedError("reset_prefix_cache(reset_running_requests=True): preempting running requests to "
                              "reset the cache is not built; requests still hold KV blocks (let them finish, or "
                              "abort them, first)")


def _load_hf_config(model: str, overrides: dict | None):
    path = Path(model)
    if not path.exists():   # vLLM would download a Hub id; here nothing is fetched: say so, naming it
        hub = re.fullmatch(r"[\w.-]+/[\w.-]+", model) is not None
        raise FileNotFoundError(f"model {model!r} is not a local directory: pagedllm does not download from the "
                                f"Hugging Face Hub; it loads a local HF checkpoint"
                                + (f" (download it first: hf download {model} --local-dir DIR, then give DIR)"
                                   if hub else ""))
    if path.is_file():
        raise FileNotFoundError(f"model {model!r} is a file: give the directory that holds config.json")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model directory {model!r} has no config.json (pagedllm loads local HF "
                                f"checkpoints: config.json, *.safetensors and tokenizer files)")
    try:
        raw = json.loads((path / "config.json").read_text())
    except ValueError:
        raw = None   # transformers says what is wrong with it, naming the file
    if isinstance(raw, dict):   # before transformers, whose words for a model type it lacks are "upgrade me"
        get_model_class({**raw, **(overrides or {})}.get("architectures"))
    hf_config = AutoConfig.from_pretrained(model)
    return served_config(apply_hf_overrides(hf_config, raw, overrides) if overrides else hf_config)


def resolve_device(device: str) -> torch.device:
    """auto, cpu, cuda or cuda:N; a CUDA device that is not there is a ValueError (the CLI: exit code 2)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            why = "this torch build has no CUDA" if torch.version.cuda is None else "torch sees no GPU"
            raise ValueError(f"--device {device} but no CUDA device is available ({why}); "
                             f"use --device cpu (or auto)")
        if (resolved.index or 0) >= count:
            raise ValueError(f"--device {device} but only {count} CUDA device(s) are available "
                             f"(cuda:0 to cuda:{count - 1})")
    return resolved


def resolve_dtype(dtype: str, hf_config, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        return getattr(torch, {"half": "float16", "float": "float32"}.get(dtype, dtype))
    if device.type == "cpu":
        return torch.float32
    ckpt = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    ckpt = getattr(torch, ckpt) if isinstance(ckpt, str) else ckpt
    if ckpt in (torch.float16, torch.bfloat16):
        return ckpt
    # as vLLM: a float32 (or unstated) checkpoint runs in the GPU's preferred dtype, bf16 where it has it
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _resolve_max_model_len(max_model_len: int | None, hf_config) -> int:
    limit = hf_config.max_position_embeddings
    if max_model_len is None:
        rope = rope_parameters(hf_config)
        if rope["rope_type"] == "longrope":   # as vLLM: short_factor's context unless a longer one is asked for
            return min(limit, rope["original_max_position_embeddings"])
        return limit
    if max_model_len > limit:
        raise ValueError(f"max_model_len ({max_model_len}) must be at most the model's max_position_embeddings "
                         f"({limit})")
    return max_model_len
