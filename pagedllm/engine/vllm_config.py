"""vLLM-shaped, read-only views of what an engine runs with: `llm.llm_engine.model_config` and `.vllm_config`
(its model_config, cache_config, parallel_config, scheduler_config, device_config, load_config, lora_config and
speculative_config, the last two None when off, as vLLM's), for scripts written against vLLM's VllmConfig.

Every value is the engine's own, resolved as vLLM resolves it (dtype a torch.dtype, tokenizer the model's when
unset, max_model_len the length in use, lora_dtype the model's when auto). vLLM's attributes pagedllm keeps no
value for (trust_remote_code and code_revision are accepted and ignored; pipeline or data parallelism,
compilation_config... are not built) are left out: reading one is an AttributeError saying it is not built and
where pagedllm's settings are, never a made-up value.
"""
from dataclasses import dataclass, replace

import torch

from pagedllm.distributed.layers import head_shard
from pagedllm.distributed.parallel_state import TPGroup
from pagedllm.models import MODEL_REGISTRY, head_dim, served_config


class _View:
    _why: dict[str, str] = {}   # a view's vLLM names that users read, and why pagedllm has no value for them

    def __getattr__(self, name: str):   # only for names not found: vLLM's others are not kept here
        kind = type(self).__name__
        why = self._why.get(name, f"pagedllm's view of vLLM's {kind} holds only the values the engine runs with")
        raise AttributeError(f"'{kind}' object has no attribute {name!r} (not built: {why}; all of pagedllm's "
                             f"settings: llm.engine.config)")


@dataclass(frozen=True)
class ParallelConfig(_View):
    tensor_parallel_size: int
    pipeline_parallel_size: int = 1   # neither is built: one pipeline stage, one data-parallel rank
    data_parallel_size: int = 1

    @property
    def world_size(self) -> int:   # vLLM's: ranks of one model replica, tensor x pipeline
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass(frozen=True, eq=False)   # eq=False: hashed by identity (it holds dicts)
class ModelConfig(_View):
    model: str
    tokenizer: str
    served_model_name: str      # an LLM's is its model (vLLM's default; pagedllm's LLM takes no other)
    revision: str | None        # a Hub-id tokenizer's revision, as tokenizer_revision's default (vLLM's)
    tokenizer_revision: str | None
    dtype: torch.dtype
    max_model_len: int
    seed: int
    hf_config: object
    quantization: str | None    # the checkpoint's quant_method, else the quantization asked for
    max_logprobs: int
    skip_tokenizer_init: bool
    enforce_eager: bool
    disable_cascade_attn: bool
    generation_config: str
    override_generation_config: dict
    hf_overrides: dict
    sampling_defaults: dict     # what get_diff_sampling_param() answers
    runner_type: str = "generate"   # generative models only are built

    @property
    def hf_text_config(self):   # text-only architectures are built: the config is its own text config
        return self.hf_config

    @property
    def architectures(self) -> list[str]:
        return list(self.hf_config.architectures or [])

    @property
    def architecture(self) -> str:   # vLLM's: the one it runs, the first the registry knows
        return next(a for a in self.architectures if a in MODEL_REGISTRY)

    def get_vocab_size(self) -> int:
        return self.hf_config.vocab_size

    def get_hidden_size(self) -> int:
        return self.hf_config.hidden_size

    def get_head_size(self) -> int:
        return head_dim(self.hf_config)

    def get_total_num_kv_heads(self) -> int:
        return getattr(self.hf_config, "num_key_value_heads", None) or self.hf_config.num_attention_heads

    def get_num_kv_heads(self, parallel_config: ParallelConfig) -> int:
        """One rank's KV heads (the one replicated head when there are fewer heads than ranks)."""
        return self._shard(parallel_config).num_kv_heads

    def get_num_attention_heads(self, parallel_config: ParallelConfig) -> int:
        return self._shard(parallel_config).num_heads

    def get_total_num_hidden_layers(self) -> int:
        return self.hf_config.num_hidden_layers

    def get_num_layers(self, parallel_config: ParallelConfig) -> int:   # one pipeline stage holds them all
        return self.hf_config.num_hidden_layers

    def get_sliding_window(self) -> int | None:   # as vLLM's: the config's (models/llama.py: the layers it is of)
        return getattr(self.hf_config, "sliding_window", None)

    def get_diff_sampling_param(self) -> dict:
        """The generation config's sampling defaults (max_new_tokens as max_tokens), as LLM.generate uses them."""
        return dict(self.sampling_defaults)

    def _shard(self, parallel_config: ParallelConfig):
        tp = TPGroup(rank=0, size=parallel_config.tensor_parallel_size)
        return head_shard(self.hf_config.num_attention_heads, self.get_total_num_kv_heads(), tp)


@dataclass(frozen=True)
class CacheConfig(_View):
    block_size: int
    gpu_memory_utilization: float
    cache_dtype: str
    enable_prefix_caching: bool
    num_gpu_blocks: int | None            # the KV blocks allocated (on the CPU too: the device's cache); None
                                          # until an engine sized the cache (create_engine_config's, as vLLM's)
    num_gpu_blocks_override: int | None
    kv_cache_memory_bytes: int | None
    kv_offloading_size: float | None


@dataclass(frozen=True)
class SchedulerConfig(_View):
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    policy: str
    enable_chunked_prefill: bool = True   # a prompt over the step budget is always prefilled in chunks
    async_scheduling: bool = True         # step N+1 is always scheduled while N runs
    runner_type: str = "generate"
    stream_interval: int = 1              # vLLM keeps it here: AsyncLLM.from_vllm_config streams at it


@dataclass(frozen=True)
class DeviceConfig(_View):
    device: torch.device   # the engine's: cuda:N when one was named (vLLM's is always the bare type)

    @property
    def device_type(self) -> str:
        return self.device.type


@dataclass(frozen=True)
class LoadConfig(_View):
    load_format: str             # auto, safetensors or dummy (random weights)
    download_dir: str | None     # where a tokenizer given as a Hub id is downloaded (the model is a local directory)


@dataclass(frozen=True, eq=False)
class LoRAConfig(_View):
    max_lora_rank: int
    max_loras: int
    max_cpu_loras: int               # None asked: max_loras (vLLM's, and the LoRA manager's)
    lora_dtype: torch.dtype          # auto: the model's, as vLLM resolves it
    target_modules: list[str] | None
    _why = {"fully_sharded_loras": "under tensor parallelism LoRA is split as vLLM's default (A whole on "
                                   "column-parallel layers, B whole on row-parallel ones) either way"}


@dataclass(frozen=True, eq=False)
class SpeculativeConfig(_View):
    method: str                     # ngram or draft_model
    num_speculative_tokens: int
    model: str                      # the draft checkpoint; "ngram" for ngram, as vLLM names it
    prompt_lookup_min: int          # ngram's, resolved; 0 with a draft model (unused), as vLLM's
    prompt_lookup_max: int
    draft_model_config: ModelConfig   # ngram: the target's, as vLLM's
    target_model_config: ModelConfig
    rejection_sample_method: str      # standard or synthetic, vLLM's names
    draft_tensor_parallel_size: int | None   # draft_model: the target's size, as vLLM resolves it; ngram: as given

    def uses_draft_model(self) -> bool:
        return self.method == "draft_model"

    def use_eagle(self) -> bool:   # EAGLE and MTP heads are not built
        return False


@dataclass(frozen=True, eq=False)
class VllmConfig(_View):
    model_config: ModelConfig
    cache_config: CacheConfig
    parallel_config: ParallelConfig
    scheduler_config: SchedulerConfig
    device_config: DeviceConfig
    load_config: LoadConfig
    lora_config: LoRAConfig | None                 # None: LoRA is off, as vLLM's
    speculative_config: SpeculativeConfig | None   # None: speculative decoding is off


def engine_vllm_config(engine) -> VllmConfig:
    """The views of a built Engine: its config after defaults, its resolved model, its KV cache's size."""
    return vllm_config_of(engine.config, engine, engine.core.runner.num_blocks, engine.default_sampling_params)


def planned_vllm_config(c) -> VllmConfig:
    """The views of an EngineConfig before any engine runs it (EngineConfig.model_config... of vLLM's
    create_engine_config()): what an AsyncLLM built on it runs with, the model's config read and device, dtype and
    max_model_len resolved now, as vLLM's, with the batch defaults of its core (a server's); the KV blocks None."""
    from pagedllm.engine.engine import is_large_gpu, resolve_model   # engine.py imports this module
    from pagedllm.engine.generation_config import load_default_sampling_params
    model = resolve_model(c)
    c = c.with_batch_defaults(is_large_gpu(model.device), serving=True)
    defaults = load_default_sampling_params(c.model, c.generation_config, c.override_generation_config)
    return vllm_config_of(c, model, None, defaults)


def vllm_config_of(c, resolved, num_blocks: int | None, sampling_defaults: dict) -> VllmConfig:
    """The views of an engine's config after defaults (c), what it resolved (hf_config, device, dtype,
    max_model_len: the Engine itself or a ResolvedModel) and its KV cache's size: an Engine's, or an AsyncLLM's
    (whose core process reports its config and block count when ready)."""
    model = _model_config(c, resolved, sampling_defaults)
    cache = CacheConfig(
        block_size=c.block_size, gpu_memory_utilization=c.gpu_memory_utilization, cache_dtype=c.kv_cache_dtype,
        enable_prefix_caching=c.enable_prefix_caching, num_gpu_blocks=num_blocks,
        num_gpu_blocks_override=c.num_gpu_blocks_override, kv_cache_memory_bytes=c.kv_cache_memory,
        kv_offloading_size=c.kv_offloading_size)
    scheduler = SchedulerConfig(max_num_seqs=c.max_num_seqs, max_num_batched_tokens=c.max_num_batched_tokens,
                                max_model_len=resolved.max_model_len, policy=c.scheduling_policy,
                                stream_interval=c.stream_interval)
    return VllmConfig(model, cache, ParallelConfig(c.tensor_parallel_size), scheduler, DeviceConfig(resolved.device),
                      LoadConfig(c.load_format, c.download_dir), _lora_config(c, resolved.dtype),
                      _speculative_config(c, model))


def _model_config(c, resolved, sampling_defaults: dict) -> ModelConfig:
    hf_config = resolved.hf_config
    return ModelConfig(
        model=c.model, tokenizer=c.tokenizer or c.model, served_model_name=c.model, revision=c.revision,
        tokenizer_revision=c.tokenizer_revision or c.revision, dtype=resolved.dtype,
        max_model_len=resolved.max_model_len, seed=c.seed, hf_config=hf_config,
        quantization=_quantization(hf_config, c.quantization),
        max_logprobs=c.max_logprobs, skip_tokenizer_init=c.skip_tokenizer_init, enforce_eager=c.enforce_eager,
        disable_cascade_attn=c.disable_cascade_attn, generation_config=c.generation_config,
        override_generation_config=dict(c.override_generation_config or {}), hf_overrides=dict(c.hf_overrides or {}),
        sampling_defaults=dict(sampling_defaults))


def _lora_config(c, dtype: torch.dtype) -> LoRAConfig | None:
    if not c.enable_lora:
        return None
    lora_dtype = dtype if c.lora_dtype == "auto" else getattr(torch, c.lora_dtype)
    return LoRAConfig(max_lora_rank=c.max_lora_rank, max_loras=c.max_loras,
                      max_cpu_loras=c.max_cpu_loras or c.max_loras, lora_dtype=lora_dtype,
                      target_modules=list(c.lora_target_modules) if c.lora_target_modules else None)


def _speculative_config(c, target: ModelConfig) -> SpeculativeConfig | None:
    spec = c.speculative
    if spec is None:
        return None
    if spec.method == "ngram":
        return SpeculativeConfig(spec.method, spec.num_speculative_tokens, "ngram", spec.prompt_lookup_min,
                                 spec.prompt_lookup_max, target, target, spec.rejection_sample_method,
                                 spec.draft_tensor_parallel_size)
    return SpeculativeConfig(spec.method, spec.num_speculative_tokens, spec.model, 0, 0,
                             _draft_model_config(target, spec.model, spec.quantization), target,
                             spec.rejection_sample_method, c.tensor_parallel_size)


def _draft_model_config(target: ModelConfig, path: str, asked_quantization: str | None) -> ModelConfig:
    """The draft's checkpoint config, read as DraftModel reads it (no hf_overrides); the target's dtype, length,
    tokenizer and the rest, which the draft runs with too."""
    from transformers import AutoConfig
    hf_config = served_config(AutoConfig.from_pretrained(path))
    return replace(target, model=path, served_model_name=path, hf_config=hf_config, hf_overrides={},
                   quantization=_quantization(hf_config, asked_quantization))


def _quantization(hf_config, asked: str | None) -> str | None:
    """As vLLM: the checkpoint's quantization_config wins over the one asked for (layers/quantization)."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return asked
    return (qc if isinstance(qc, dict) else qc.to_dict()).get("quant_method")
