"""Engine configuration: the only place defaults live.

The CLI (`pagedllm.cli`) generates its flags from these fields; `help` in each field's metadata is the flag's
help text. Flag names follow vLLM's where the meaning is the same.
"""
import importlib.util
import json
import os
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path

from pagedllm.field_types import check_types, json_object
from pagedllm.profiler import ProfilerConfig

DEMO_MODEL = str(Path(__file__).parent / "demo" / "stories260k")

_DTYPES = ("auto", "float32", "float16", "bfloat16", "half", "float")   # half, float: vLLM's aliases
_LOAD_FORMATS = ("auto", "safetensors", "dummy")
_PREEMPTION_MODES = ("recompute", "swap", "offload")
_SWAP_SPACE_GIB = 4.0   # vLLM V0's default for the same pool
_KV_OFFLOADING_BACKENDS = ("native",)   # vLLM's other one, lmcache, is not built
_SCHEDULING_POLICIES = ("fcfs", "priority")
QUANTIZATIONS = ("fp8",)
_KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
_EXECUTOR_BACKENDS = ("mp", "ray")
_LORA_DTYPES = ("auto", "float16", "bfloat16", "float32")   # vLLM's CLI takes the first three, its Python any
# lora/layers.py's MODULES: each fused linear's name and the HF modules fused in it (tests hold them equal)
LORA_TARGET_MODULES = ("qkv_proj", "q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "gate_proj", "up_proj",
                       "down_proj")
# server/tool_parsers' registry (tests hold them equal)
TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral", "pythonic", "llama4_pythonic", "qwen3_coder")
REASONING_PARSERS = ("qwen3", "deepseek_r1", "mistral", "mimo")   # server/reasoning.py's PARSERS
CONTENT_FORMATS = ("auto", "string", "openai")   # chat_template.py's (vLLM's --chat-template-content-format)
FINGERPRINT_MODES = ("full", "hash", "custom", "none")   # vLLM's --fingerprint-mode


def _f(default, help: str, **kw):
    if isinstance(default, list):   # mutable: each config gets its own copy
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class EngineConfig:
    model: str = _f(DEMO_MODEL, "model directory (HF layout: config.json, *.safetensors, tokenizer)")
    tokenizer: str | None = _f(None, "tokenizer directory (default: the model directory)")
    # vLLM's Hub flags: the model is a local directory here, so they reach only a tokenizer given as a Hub id
    revision: str | None = _f(None, "the Hub revision (branch, tag or commit) of a tokenizer given as a Hub id, "
                                    "unless --tokenizer-revision (vLLM's flag; a local directory ignores it)")
    tokenizer_revision: str | None = _f(None, "the Hub revision of a tokenizer given as a Hub id (vLLM's flag; "
                                              "default: --revision)")
    download_dir: str | None = _f(None, "where a tokenizer given as a Hub id is downloaded (vLLM's flag; default: "
                                        "the Hugging Face cache)")
    hf_token: str | None = _f(None, "the Hugging Face token for a tokenizer given as a Hub id (vLLM's flag; "
                                    "LLM(hf_token=True): the one `hf auth login` stored)", python_types=(str, bool))
    skip_tokenizer_init: bool = _f(False, "load no tokenizer: prompts are token ids, outputs carry token ids "
                                          "and empty text (offline; not with serve)")
    dtype: str = _f("auto", "weights and activations dtype (half = float16, float = float32); auto = "
                            "the checkpoint's fp16/bf16 on GPU (a float32 one: bfloat16 where the GPU has it, "
                            "else float16), float32 on CPU", choices=_DTYPES)
    device: str = _f("auto", "cpu, cuda or cuda:N; auto = cuda when available")
    quantization: str | None = _f(None, "fp8: linear layers' weights in float8_e4m3 per output channel (quantized "
                                        "at load, or as a pre-quantized fp8 / compressed-tensors checkpoint "
                                        "stores them), activations per token, GEMMs on FP8 tensor cores "
                                        "(emulated on CPU); None = the checkpoint's own quantization_config "
                                        "if any, else none", choices=QUANTIZATIONS, aliases=["-q"])
    kv_cache_dtype: str = _f("auto", "KV cache element type: auto = the model dtype; fp8 (= fp8_e4m3): "
                                     "float8_e4m3 with a scale per layer (the checkpoint's k_scale/v_scale, "
                                     "else 1.0), half the bytes of bf16", choices=_KV_CACHE_DTYPES)
    load_format: str = _f("auto", "auto/safetensors read the checkpoint; dummy = random weights",
                          choices=_LOAD_FORMATS)
    seed: int = _f(0, "seed of the global random state (requests without their own seed)")
    max_logprobs: int = _f(20, "most logprobs (and prompt_logprobs) a request may ask for per token, as vLLM's "
                               "(20: OpenAI's top_logprobs bound); -1 = the vocabulary size. Beam search asks for "
                               "2 x beam_width (more with several EOS ids) a step, so it bounds the beam width too")
    generation_config: str = _f("auto", "sampling defaults (temperature, top_p, top_k, min_p, "
                                        "repetition_penalty, max_new_tokens as max_tokens) for what requests "
                                        "leave unset: auto = the "
                                        "model's generation_config.json, vllm = none, or a directory "
                                        "holding a generation_config.json")
    override_generation_config: str | None = _f(None, "a JSON object over the generation config's values, also with "
                                                "generation_config vllm (vLLM's flag), e.g. '{\"temperature\": "
                                                "0.5}'; keys: temperature, top_p, top_k, min_p, "
                                                "repetition_penalty, max_new_tokens", python_types=(str, dict))
    hf_overrides: str | None = _f(None, "a JSON object over the model's config.json values at load (vLLM's "
                                        "flag), e.g. '{\"max_position_embeddings\": 65536, \"rope_scaling\": "
                                        "{\"rope_type\": \"yarn\", \"factor\": 2.0, ...}}'; a key's value "
                                        "replaces the checkpoint's whole, except a sub-config's (text_config), "
                                        "merged key by key", python_types=(str, dict))
    block_size: int = _f(16, "tokens per KV cache block")
    max_model_len: int | None = _f(None, "longest prompt + output, also as vLLM's 32k (32000) or 32K (32768) "
                                         "(default: the model's max_position_embeddings)", human_readable=True,
                                  not_built={v: "vLLM's --max-model-len auto (the longest that fits in memory) is "
                                                "not built here; leave --max-model-len out for the model's "
                                                "max_position_embeddings, or give a number" for v in ("auto", "-1")})
    max_num_seqs: int | None = _f(None, "most requests running in one step (default: 512 on a GPU of 70 GiB or "
                                        "more other than an A100, else 256)")
    max_num_batched_tokens: int | None = _f(None, "token budget of one step (also as 8k or 8K); longer prompts "
                                                  "are prefilled in "
                                                  "chunks (default, as vLLM: 16384 offline and 8192 when serving "
                                                  "on such a GPU, else 8192)", human_readable=True)
    enable_prefix_caching: bool = _f(True, "reuse the KV of cached full blocks across requests (off: the n "
                                           "sequences of one request still share their prompt's blocks)")
    gpu_memory_utilization: float = _f(0.90, "share of the GPU's total memory this engine may use: weights, "
                                              "activations (profiled) and the KV cache in what is left (at most 4x "
                                              "what max_num_seqs requests of max_model_len tokens use)")
    kv_cache_memory: int | None = _f(None, "bytes of KV cache, instead of sizing it from gpu_memory_utilization, "
                                           "also as 8G (8 GiB) or 8g (8e9), and as vLLM's --kv-cache-memory-bytes "
                                           "(default on CPU: enough for max_num_seqs full-length requests, at "
                                           "most 4 GiB)", human_readable=True, aliases=["--kv-cache-memory-bytes"])
    num_gpu_blocks_override: int | None = _f(None, "exact number of KV blocks (tests, debugging)")
    enforce_eager: bool = _f(False, "never use CUDA graphs (they replay decode and small mixed steps)")
    disable_cascade_attn: bool = _f(False, "GPU decode reads each row's whole context itself, instead of reading "
                                    "the segments many rows share (a cached prompt) once for all of them")
    log_stats_interval: float = _f(10.0, "seconds between engine statistics log lines; 0 turns them off")
    preemption_mode: str = _f("recompute", "what happens to a preempted request's KV: recompute it later (as "
                                           "vLLM 0.26 always does: it has no such flag), swap it to CPU memory "
                                           "(swap_space; vLLM V0's swap), or offload its full blocks to the disk "
                                           "tier (needs kv_disk_dir)", choices=_PREEMPTION_MODES)
    scheduling_policy: str = _f("fcfs", "which waiting request is admitted first and which running one is "
                                        "preempted: fcfs (arrival order; the newest is preempted) or priority "
                                        "(a request's priority, lower first, then arrival: vLLM's)",
                                choices=_SCHEDULING_POLICIES)
    stream_interval: int = _f(1, "streamed outputs (the server's chunks, DELTA and CUMULATIVE outputs) come every "
                                 "this many tokens (the first token and the last at once); 1: one for each engine "
                                 "step, as it ends (vLLM's; its EngineArgs' and scheduler_config's)")
    swap_space: float | None = _f(None, "GiB of CPU memory for the blocks of swapped-out requests, only with "
                                        f"preemption_mode swap (default there: {_SWAP_SPACE_GIB:g}), as vLLM V0's "
                                        "flag (vLLM V1 ignored it; 0.18 and later have none); under tensor "
                                        "parallelism a rank's, as vLLM V0's (per GPU)")
    kv_offloading_size: float | None = _f(None, "GiB of CPU memory for the CPU tier of the prefix cache (vLLM's "
                                                "flag): full blocks evicted from the GPU keep their KV there "
                                                "(LRU) and prefix hits load it back; None = off; under tensor "
                                                "parallelism all ranks' together, as vLLM's")
    kv_offloading_backend: str = _f("native", "who runs the CPU tier (vLLM's flag): native, pagedllm's own; "
                                              "vLLM's lmcache is not built", choices=_KV_OFFLOADING_BACKENDS,
                                  why_not="vLLM's lmcache is not built: pagedllm's own CPU tier is native")
    cpu_offload_gb: float = _f(0.0, "vLLM's flag: GiB of model weights kept in CPU memory; that is not built here, "
                                    "so only 0 is taken (the KV cache's CPU tier is kv_offloading_size)")
    kv_disk_dir: str | None = _f(None, "directory of the disk tier of the prefix cache (below the CPU tier, LRU); "
                                       "it survives restarts; None = off")
    kv_disk_gb: float = _f(16.0, "GiB the disk tier may use in kv_disk_dir (per model identity; under tensor "
                                 "parallelism all ranks' files together)")
    structured_outputs_compile_timeout: float = _f(30.0, "seconds a structured-output constraint (JSON schema, "
                                                   "regex, grammar) may take to compile; past it the requests "
                                                   "waiting for it fail with a 400, the engine runs on")
    structured_outputs_compile_workers: int = _f(4, "threads that compile constraints off the step loop")
    structured_outputs_config: str | None = _f(None, "vLLM's JSON object: backend (xgrammar or auto: xgrammar is "
                                               "the one here), disable_any_whitespace and "
                                               "disable_additional_properties (every request's JSON constraint "
                                               "gets them, beside its own), disable_fallback (no other backend to "
                                               "fall back to)", python_types=(str, dict))
    speculative_config: str | None = _f(None, "speculative decoding, a JSON object with vLLM's keys: method "
                                        "(ngram or draft_model), num_speculative_tokens, prompt_lookup_min/max "
                                        "(ngram), model and quantization (draft_model: the draft's own, not "
                                        "--quantization), rejection_sample_method (standard or "
                                        "synthetic, with synthetic_acceptance_rate(s)), disable_by_batch_size, "
                                        "max_step_tokens; vLLM's other keys where they ask for what runs "
                                        "here; None = off",
                                        python_types=(str, dict), aliases=["-sc"])
    spec_method: str | None = _f(None, "vLLM's short form of speculative_config's method (merged into it; naming "
                                       "a key it has too is an error)")
    spec_model: str | None = _f(None, "vLLM's short form of speculative_config's model (the draft checkpoint)")
    spec_tokens: int | None = _f(None, "vLLM's short form of speculative_config's num_speculative_tokens")
    enable_lora: bool = _f(False, "serve LoRA adapters (PEFT) over the base model, several in one step (on CUDA: "
                                  "Triton kernels inside the CUDA graphs)")
    max_loras: int = _f(1, "most distinct LoRA adapters in one step (device slots)")
    max_lora_rank: int = _f(16, "largest LoRA rank served; adapters are zero-padded to it")
    max_cpu_loras: int | None = _f(None, "LoRA adapters kept loaded in CPU memory (LRU; default, or 0 as in vLLM: "
                                         "max_loras)")
    lora_dtype: str = _f("auto", "dtype of the LoRA adapters' weights in the device slots; auto = the model's "
                                 "(vLLM's flag; a torch.dtype from Python)", choices=_LORA_DTYPES)
    lora_target_modules: list[str] | None = _f(None, "the decoder linears that take LoRA adapters (vLLM's flag), by "
                                                     "name: q_proj, k_proj, v_proj (or qkv_proj: the three are one "
                                                     "fused linear), o_proj, gate_proj, up_proj (or gate_up_proj), "
                                                     "down_proj; an adapter's weights elsewhere are not applied "
                                                     "(logged); None = all", nargs="+")
    profiler_config: str | None = _f(None, "vLLM's torch profiler, a JSON object or --profiler-config.KEY VALUE: "
                                           "profiler torch with torch_profiler_dir (both needed) traces each "
                                           "rank's steps between LLM.start_profile() and stop_profile() (the "
                                           "server: POST /start_profile, /stop_profile, served only then) into "
                                           "that directory, a gzipped file per rank; keys torch_profiler_"
                                           "with_stack, _with_flops, _use_gzip, _record_shapes, _with_memory, "
                                           "_dump_cuda_time_total, ignore_frontend, delay_iterations, "
                                           "max_iterations; profiler cuda: cudaProfilerStart/Stop (nsys)",
                                     python_types=(str, dict, ProfilerConfig))
    tensor_parallel_size: int = _f(1, "GPUs (ranks) the model is split over: each holds its share of the heads, "
                                      "MLP columns and vocabulary, and their KV cache; ranks 1..N-1 run in worker "
                                      "processes (on CPU: gloo, for tests)", aliases=["-tp"])
    distributed_executor_backend: str | None = _f(None, "who runs ranks 1..N-1 when tensor_parallel_size > 1: mp "
                                                  "(processes on this machine, the default) or ray (actors on the "
                                                  "GPUs of a Ray cluster, joined with ray.init(address='auto'); "
                                                  "needs `pip install ray`); unused at size 1",
                                                  choices=_EXECUTOR_BACKENDS)

    def __post_init__(self):
        if type(self.lora_dtype).__name__ == "dtype":   # vLLM's LLM(lora_dtype=torch.float16), without torch here
            self.lora_dtype = str(self.lora_dtype).removeprefix("torch.")
        check_types(self)
        self._merge_spec_aliases()
        _check(self.dtype in _DTYPES, "dtype", f"one of {_DTYPES}", self.dtype)
        _check(self.quantization in (None, *QUANTIZATIONS), "quantization", f"None or one of {QUANTIZATIONS}",
               self.quantization)
        _check(self.kv_cache_dtype in _KV_CACHE_DTYPES, "kv_cache_dtype", f"one of {_KV_CACHE_DTYPES}",
               self.kv_cache_dtype)
        _check(type(self.stream_interval) is int and self.stream_interval >= 1, "stream_interval",
               "an integer >= 1 (tokens per streamed output)", self.stream_interval)
        _check(self.load_format in _LOAD_FORMATS, "load_format", f"one of {_LOAD_FORMATS}", self.load_format)
        _check(self.block_size in (1, 2, 4, 8, 16, 32, 64, 128), "block_size",
               "a power of two from 1 to 128", self.block_size)
        _check(self.max_num_seqs is None or self.max_num_seqs >= 1, "max_num_seqs", ">= 1", self.max_num_seqs)
        _check(self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1, "max_num_batched_tokens",
               ">= 1", self.max_num_batched_tokens)
        _check(self.max_model_len is None or self.max_model_len >= 1, "max_model_len", ">= 1",
               self.max_model_len)
        _check(self.max_logprobs >= -1, "max_logprobs", ">= 0, or -1 (the vocabulary size)", self.max_logprobs)
        _check(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", "in (0, 1]",
               self.gpu_memory_utilization)
        _check(self.kv_cache_memory is None or self.kv_cache_memory > 0, "kv_cache_memory", "> 0 bytes",
               self.kv_cache_memory)
        _check(self.num_gpu_blocks_override is None or self.num_gpu_blocks_override >= 1,
               "num_gpu_blocks_override", ">= 1", self.num_gpu_blocks_override)
        _check(self.structured_outputs_compile_timeout > 0, "structured_outputs_compile_timeout", "> 0 seconds",
               self.structured_outputs_compile_timeout)
        _check(self.structured_outputs_compile_workers >= 1, "structured_outputs_compile_workers", ">= 1",
               self.structured_outputs_compile_workers)
        self.override_generation_config = json_object(self.override_generation_config, "override_generation_config")
        self.hf_overrides = json_object(self.hf_overrides, "hf_overrides")
        self.structured_outputs_config = _structured_outputs_config(self.structured_outputs_config)
        self.profiler_config = ProfilerConfig.parse(self.profiler_config)   # always one: .profiler None is off
        from pagedllm.engine.generation_config import DEFAULT_KEYS
        unknown = sorted(set(self.override_generation_config or ()) - set(DEFAULT_KEYS))
        _check(not unknown, "override_generation_config", f"made of the keys {list(DEFAULT_KEYS)}", unknown)
        self._check_kv_tiers()
        self._check_lora()
        self._check_tensor_parallel()
        from pagedllm.spec_decode.config import SpeculativeConfig
        self.speculative = SpeculativeConfig.parse(self.speculative_config)   # None: off
        if self.speculative is not None:
            self.speculative.check_ranks(self.tensor_parallel_size)

    def _merge_spec_aliases(self):
        """vLLM's --spec-method / --spec-model / --spec-tokens (LLM's spec_* too) go into speculative_config, as
        its create_speculative_config puts them; then they are cleared, so that a copy of the config
        (dataclasses.replace) does not merge them twice."""
        aliases = [(key, flag, getattr(self, flag)) for key, flag in (
            ("method", "spec_method"), ("model", "spec_model"), ("num_speculative_tokens", "spec_tokens"))]
        aliases = [alias for alias in aliases if alias[2] is not None]
        if not aliases:
            return
        merged = dict(json_object(self.speculative_config, "speculative_config") or {})
        for key, flag, value in aliases:
            _check(key not in merged, flag, f"left out where speculative_config gives {key} (vLLM: mutually "
                   f"exclusive)", value)
            merged[key] = value
        self.speculative_config = json.dumps(merged)
        self.spec_method = self.spec_model = self.spec_tokens = None

    def _check_kv_tiers(self):
        _check(self.scheduling_policy in _SCHEDULING_POLICIES, "scheduling_policy",
               f"one of {_SCHEDULING_POLICIES}", self.scheduling_policy)
        _check(self.preemption_mode in _PREEMPTION_MODES, "preemption_mode", f"one of {_PREEMPTION_MODES}",
               self.preemption_mode)
        # set without swap preemption it would size nothing: refused, not ignored (vLLM V1 ignored it)
        _check(self.swap_space is None or self.preemption_mode == "swap", "swap_space",
               "None (unset) unless preemption_mode is swap, the only mode that uses it", self.swap_space)
        if self.preemption_mode == "swap" and self.swap_space is None:
            self.swap_space = _SWAP_SPACE_GIB
        _check(self.swap_space is None or self.swap_space > 0, "swap_space", "> 0 GiB", self.swap_space)
        _check(self.cpu_offload_gb == 0, "cpu_offload_gb", "0: offloading model weights to CPU memory (vLLM's "
               "--cpu-offload-gb) is not built; a CPU tier of the KV cache is kv_offloading_size "
               "(--kv-offloading-size)", self.cpu_offload_gb)
        _check(self.kv_offloading_size is None or self.kv_offloading_size > 0, "kv_offloading_size",
               "> 0 GiB, or None (off)", self.kv_offloading_size)
        _check(self.kv_offloading_backend in _KV_OFFLOADING_BACKENDS, "kv_offloading_backend",
               f"one of {_KV_OFFLOADING_BACKENDS} (vLLM's lmcache is not built)", self.kv_offloading_backend)
        memory = host_memory_gib()   # the CPU pools' sizes: past it, only the allocator's words would say so
        # swap_space is a rank's (vLLM V0's: per GPU), and the mp executor's ranks share this host
        n = self.tensor_parallel_size if isinstance(self.tensor_parallel_size, int) and self.tensor_parallel_size > 1 \
            and self.distributed_executor_backend != "ray" else 1
        for name, gib, ranks in (("swap_space", self.swap_space or 0, n),
                                 ("kv_offloading_size", self.kv_offloading_size or 0, 1)):
            _check(memory is None or gib * ranks <= memory, name, f"at most this machine's memory ({memory or 0:.1f} "
                   f"GiB)" + (f" over {ranks} ranks (each rank has a swap pool of this size)" if ranks > 1 else ""),
                   gib)
        _check(self.log_stats_interval >= 0, "log_stats_interval", ">= 0 seconds (0: off)", self.log_stats_interval)
        _check(-2**63 <= self.seed < 2**64, "seed", "in [-2**63, 2**64) (torch's generator seeds)", self.seed)
        _check(self.kv_disk_dir != "", "kv_disk_dir", "a directory path or None (off)", self.kv_disk_dir)
        _check(self.kv_disk_dir is None or not os.path.exists(self.kv_disk_dir) or os.path.isdir(self.kv_disk_dir),
               "kv_disk_dir", "a directory (or a path to create one at)", self.kv_disk_dir)
        _check(self.kv_disk_gb > 0, "kv_disk_gb", "> 0 GiB", self.kv_disk_gb)
        _check(self.kv_disk_dir is not None or self.preemption_mode != "offload", "kv_disk_dir",
               "set with preemption_mode offload (blocks are offloaded to the disk tier)", self.kv_disk_dir)
        _check(self.kv_disk_dir is None or self.kv_offloading_size is not None, "kv_offloading_size",
               "set when kv_disk_dir is set (disk blocks are read and written through the CPU tier)",
               self.kv_offloading_size)

    def _check_lora(self):
        if isinstance(self.max_cpu_loras, int) and self.max_cpu_loras <= 0:
            self.max_cpu_loras = None   # vLLM's: 0 or less is the default (max_loras)
        _check(isinstance(self.max_loras, int) and self.max_loras >= 1, "max_loras", "an integer >= 1",
               self.max_loras)
        _check(self.lora_dtype in _LORA_DTYPES, "lora_dtype", f"one of {_LORA_DTYPES}", self.lora_dtype)
        unknown = [m for m in self.lora_target_modules or () if m not in LORA_TARGET_MODULES]
        _check(self.lora_target_modules is None or (self.lora_target_modules and not unknown), "lora_target_modules",
               f"None (all) or names among {LORA_TARGET_MODULES} (LoRA on embed_tokens or lm_head, which vLLM also "
               f"serves, is not built)", unknown or self.lora_target_modules)
        _check(isinstance(self.max_lora_rank, int) and self.max_lora_rank >= 1, "max_lora_rank",
               "an integer >= 1", self.max_lora_rank)
        _check(self.max_cpu_loras is None or self.max_cpu_loras >= self.max_loras, "max_cpu_loras",
               f"None or >= max_loras ({self.max_loras})", self.max_cpu_loras)
        _check(not (self.enable_lora and self.quantization), "quantization",
               "None with enable_lora (LoRA over FP8 linears is not built yet)", self.quantization)

    def _check_tensor_parallel(self):
        n = self.tensor_parallel_size
        _check(isinstance(n, int) and n >= 1, "tensor_parallel_size", "an integer >= 1", n)
        _check(self.distributed_executor_backend in (None, *_EXECUTOR_BACKENDS), "distributed_executor_backend",
               f"None or one of {_EXECUTOR_BACKENDS}", self.distributed_executor_backend)
        if n == 1:
            return
        _check(self.distributed_executor_backend != "ray" or importlib.util.find_spec("ray") is not None,
               "distributed_executor_backend", "mp, or ray with the ray package installed (pip install ray)",
               self.distributed_executor_backend)

    def with_batch_defaults(self, large_gpu: bool, serving: bool) -> "EngineConfig":
        """max_num_seqs and max_num_batched_tokens left unset get defaults for the machine, as vLLM does:
        larger batches on GPUs of 70 GiB or more (H100, H200), a smaller step budget when serving (latency).
        vLLM runs up to 1024 requests there; 512 measured better on W2 (H200: 1024 preempted 50 times and
        gave 5,588 tok/s, 512 gave 5,753), and the larger CUDA graphs stop at 512 anyway."""
        seqs = 512 if large_gpu else 256
        tokens = (8192 if serving else 16384) if large_gpu else 8192
        return replace(self, max_num_seqs=self.max_num_seqs or seqs,
                       max_num_batched_tokens=self.max_num_batched_tokens or tokens)

    # vLLM's create_engine_config() returns a VllmConfig that scripts read (`.model_config.max_model_len`,
    # `.cache_config.block_size`): the same read-only views here (engine/vllm_config.py), of what an AsyncLLM
    # built on this config runs with, resolved at each read (the model's config.json read, as vLLM's does)
    @property
    def model_config(self):
        return self._planned().model_config

    @property
    def cache_config(self):
        return self._planned().cache_config

    @property
    def parallel_config(self):
        return self._planned().parallel_config

    @property
    def scheduler_config(self):
        return self._planned().scheduler_config

    def _planned(self):
        from pagedllm.engine.vllm_config import planned_vllm_config
        return planned_vllm_config(self)

    def logprobs_bound(self, vocab_size: int) -> int:
        """The most logprobs a request may ask for: max_logprobs, -1 read as the vocabulary size (vLLM's), and
        never past it (the sampler's top-k of more than the vocabulary would fail mid-step)."""
        return vocab_size if self.max_logprobs == -1 else min(self.max_logprobs, vocab_size)

    @property
    def kv_tiers_enabled(self) -> bool:
        return self.preemption_mode != "recompute" or self.kv_offloading_size is not None


@dataclass
class ServerConfig:
    """`pagedllm serve`: the HTTP side (engine flags come from EngineConfig)."""
    host: str = _f("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = _f(8000, "port to listen on")
    api_key: list[str] = _f([], "require `Authorization: Bearer KEY` on the routes that run the model or the "
                                "tokenizer (/v1/*, /tokenize, /detokenize); several keys (vLLM's --api-key k1 k2): "
                                "any of them (default: the PAGEDLLM_API_KEY environment variable, else vLLM's "
                                "VLLM_API_KEY; unset = no key; Python callers may pass one str)", nargs="+")
    served_model_name: list[str] = _f([], "model name in the API (default: the model argument); several names "
                                          "(vLLM's --served-model-name a b) all answer for the model, the first "
                                          "names it in /metrics and /v1/models' first card", nargs="+")
    chat_template: str | None = _f(None, "chat template (a file or the template text) when the tokenizer has "
                                         "none, or to replace its own")
    return_tokens_as_token_ids: bool = _f(False, "logprobs name their tokens \"token_id:<id>\" (vLLM's flag; a "
                                                 "request's return_tokens_as_token_ids overrides it)")
    trust_request_chat_template: bool = _f(False, "let a chat request bring its own chat_template (vLLM's flag); "
                                                  "without it such a request is a 400: a template is code the "
                                                  "tokenizer thread runs")
    max_waiting_queue_length: int | None = _f(None, "refuse new requests with 503 while this many sequences "
                                                    "wait for their first step (a request counts its n; one "
                                                    "with n above the bound is a 400) (default: no bound)")
    engine_heartbeat_timeout: float = _f(5.0, "seconds without a heartbeat from the engine core process (a "
                                              "thread of it sends one every second, also during a step) after "
                                              "which it counts as stopped: /health is 503, requests in flight fail")
    engine_step_timeout: float = _f(60.0, "seconds one pass of the engine core's step loop may take (a long "
                                          "prefill, a kernel compiling) before the core counts as hung, as "
                                          "vLLM's VLLM_ENGINE_ITERATION_TIMEOUT_S: /health 503, requests fail")
    responses_store: int = _f(0, "how many /v1/responses answers to keep for requests with store: true (the last "
                                 "N, in memory): previous_response_id continues one, GET and DELETE "
                                 "/v1/responses/{id} read and remove one; 0: store true is a 400 (vLLM: "
                                 "VLLM_ENABLE_RESPONSES_API_STORE=1, which keeps every one)")
    api_server_count: int = _f(1, "API processes serving HTTP on the one port, all in front of one engine core "
                                  "(vLLM's flag): more when one process's HTTP, tokenizing and streaming work cannot "
                                  "keep up with the engine")
    log_level: str = _f("info", "log level of pagedllm and uvicorn", choices=("debug", "info", "warning", "error"))
    uvicorn_log_level: str | None = _f(None, "uvicorn's own log level (vLLM's flag; default: log_level)",
                                       choices=("critical", "error", "warning", "info", "debug", "trace"))
    disable_uvicorn_access_log: bool = _f(False, "no access log line for each HTTP request (vLLM's flag)")
    enable_log_requests: bool = _f(False, "log each request the server takes (vLLM's flag): its id, sampling "
                                          "params and LoRA at info, its prompt at debug (--log-level debug)")
    max_log_len: int | None = _f(None, "most prompt characters and prompt token ids a request's log line shows "
                                       "(vLLM's flag; default: all)")
    max_request_body_bytes: int = _f(8 << 20, "refuse (413) request bodies larger than this; 8 MiB holds a "
                                              "1M-token prompt as text or ~1M token ids as JSON")
    # CORS, TLS and root path: vLLM's flags and formats (lists as JSON: --allowed-origins '["https://a.b"]').
    allowed_origins: list[str] = _f([], "origins whose browser pages may call this server (CORS; \"*\": any). "
                                        "vLLM allows any by default; here none (no CORS headers): any web page "
                                        "the user visits could otherwise use a server on their machine")
    allowed_methods: list[str] = _f(["*"], "methods allowed to those origins (CORS)")
    allowed_headers: list[str] = _f(["*"], "request headers allowed to those origins (CORS)")
    allow_credentials: bool = _f(False, "let those origins send credentials: cookies, Authorization (CORS)")
    ssl_keyfile: str | None = _f(None, "TLS private key file (PEM); with ssl_certfile, the server speaks HTTPS")
    ssl_certfile: str | None = _f(None, "TLS certificate file (PEM), with ssl_keyfile")
    enable_auto_tool_choice: bool = _f(False, "let requests use tool_choice \"auto\" (the default when tools are "
                                              "given): the model's text is read for calls by tool_call_parser")
    tool_call_parser: str | None = _f(None, "how tool calls are read from the model's text (tool_choice auto): "
                                            "hermes = <tool_call>{...}</tool_call> (Qwen2.5, Qwen3, Hermes)",
                                      choices=TOOL_CALL_PARSERS)
    reasoning_parser: str | None = _f(None, "read chat answers' <think>...</think> into a `reasoning` field apart "
                                            "from content (vLLM's flag): qwen3 (Qwen3; mimo: vLLM's other name "
                                            "for it), deepseek_r1 (DeepSeek-R1 and its distills, QwQ), mistral "
                                            "(Magistral's [THINK]...[/THINK]); structured output and enforced "
                                            "tool calls then apply from the end of the reasoning",
                                      choices=REASONING_PARSERS)
    enable_request_id_headers: bool = _f(False, "every response carries X-Request-Id: the request's own, else a "
                                                 "new one (vLLM's flag)")
    disable_fastapi_docs: bool = _f(False, "no /docs, /redoc or /openapi.json (vLLM's flag)")
    root_path: str | None = _f(None, "path prefix a proxy in front of the server adds (e.g. /llm): routes answer "
                                     "with and without it, and /openapi.json names it")
    # vLLM's chat and usage flags
    response_role: str = _f("assistant", "the role of chat answers written after a generation prompt")
    default_chat_template_kwargs: str | None = _f(None, "a JSON object of chat template variables every chat "
                                                        "request gets, e.g. '{\"enable_thinking\": false}'; a "
                                                        "request's chat_template_kwargs override its keys",
                                                  python_types=(str, dict))
    chat_template_content_format: str = _f("auto", "how a message's content reaches the chat template: string "
                                                   "(its text), openai (a list of {\"type\": \"text\", \"text\": "
                                                   "...} parts), auto (openai for a template that loops over a "
                                                   "message's content, else string)",
                                           choices=CONTENT_FORMATS)
    exclude_tools_when_tool_choice_none: bool = _f(False, "with tool_choice \"none\", the tools do not reach the "
                                                          "chat template (by default they do, as vLLM's)")
    enable_prompt_tokens_details: bool = _f(False, "chat and completions usage carries prompt_tokens_details."
                                                   "cached_tokens, the prompt tokens the prefix cache held (0 "
                                                   "too, as vLLM's)")
    enable_per_request_metrics: bool = _f(False, "chat and completions answers of one sequence carry `metrics`: "
                                                 "its queue time, time to first token, generation time, mean "
                                                 "inter-token latency (ms) and tokens per second (vLLM's; in a "
                                                 "stream, on its usage chunk)")
    enable_force_include_usage: bool = _f(False, "streamed chat and completions answers end with a usage chunk, "
                                                 "and every chunk carries its choice's usage so far, whatever "
                                                 "stream_options says (vLLM's)")
    enable_tokenizer_info_endpoint: bool = _f(False, "serve GET /tokenizer_info: the tokenizer's configuration "
                                                     "(tokenizer_config.json's keys, less its file paths) and the "
                                                     "--chat-template (vLLM's flag; it shows the template to "
                                                     "clients)")
    fingerprint_mode: str = _f("full", "the system_fingerprint of chat and completions answers (vLLM's flag): full "
                                       "= pagedllm-<version>[-tp<N>]-<8 hex of the engine config's hash>, hash = "
                                       "without the tp part, custom = --fingerprint-value, none = no fingerprint",
                               choices=FINGERPRINT_MODES)
    fingerprint_value: str | None = _f(None, "the system_fingerprint with --fingerprint-mode custom (vLLM's flag)")
    lora_modules: list[str] = _f([], "LoRA adapters served by name (needs --enable-lora), vLLM's forms: name=path, "
                                     "or JSON '{\"name\": ..., \"path\": ..., \"base_model_name\": ...}'; "
                                     "several after one flag; loaded at start-up, chosen by a request's model",
                                 nargs="+")

    def __post_init__(self):
        _check(0 <= self.port < 65536, "port", "in [0, 65535]", self.port)
        _check(self.max_waiting_queue_length is None or self.max_waiting_queue_length >= 1,
               "max_waiting_queue_length", ">= 1", self.max_waiting_queue_length)
        _check(self.max_request_body_bytes >= 1, "max_request_body_bytes", ">= 1", self.max_request_body_bytes)
        _check(self.max_log_len is None or self.max_log_len >= 0, "max_log_len", "None or >= 0",
               self.max_log_len)
        if self.api_key is None or isinstance(self.api_key, str):   # Python callers: one key, or none
            self.api_key = [self.api_key] if self.api_key else []
        _check(isinstance(self.api_key, list) and all(isinstance(k, str) and k for k in self.api_key), "api_key",
               "non-empty strings", self.api_key)
        self.default_chat_template_kwargs = json_object(self.default_chat_template_kwargs,
                                                         "default_chat_template_kwargs")
        _check(self.chat_template_content_format in CONTENT_FORMATS, "chat_template_content_format",
               f"one of {CONTENT_FORMATS}", self.chat_template_content_format)
        _check(isinstance(self.response_role, str) and self.response_role != "", "response_role",
               "a role name", self.response_role)
        for name in ("allowed_origins", "allowed_methods", "allowed_headers"):
            value = getattr(self, name)
            _check(isinstance(value, list) and all(isinstance(v, str) for v in value), name,
                   "a list of strings", value)
        _check((self.ssl_keyfile is None) == (self.ssl_certfile is None), "ssl_keyfile",
               "set together with ssl_certfile", self.ssl_keyfile)
        _check(self.root_path is None or (self.root_path.startswith("/") and not self.root_path.endswith("/")),
               "root_path", "a path that starts with / and does not end with /", self.root_path)
        _check(self.engine_heartbeat_timeout >= 2, "engine_heartbeat_timeout", ">= 2 (seconds; the core sends "
               "one every second)", self.engine_heartbeat_timeout)
        _check(self.tool_call_parser is not None or not self.enable_auto_tool_choice, "tool_call_parser",
               "set with enable_auto_tool_choice (it reads the calls)", self.tool_call_parser)
        _check(self.tool_call_parser in (None, *TOOL_CALL_PARSERS), "tool_call_parser",
               f"one of {TOOL_CALL_PARSERS}", self.tool_call_parser)
        _check(self.reasoning_parser in (None, *REASONING_PARSERS), "reasoning_parser",
               f"one of {REASONING_PARSERS}", self.reasoning_parser)
        _check(self.fingerprint_mode in FINGERPRINT_MODES, "fingerprint_mode", f"one of {FINGERPRINT_MODES}",
               self.fingerprint_mode)
        _check(self.engine_step_timeout >= 2, "engine_step_timeout", ">= 2 seconds", self.engine_step_timeout)
        _check(isinstance(self.api_server_count, int) and 1 <= self.api_server_count <= 64, "api_server_count",
               "an integer in [1, 64]", self.api_server_count)
        _check(isinstance(self.responses_store, int) and self.responses_store >= 0, "responses_store",
               "an integer >= 0", self.responses_store)
        _check(self.responses_store == 0 or self.api_server_count == 1, "responses_store",
               "0 with api_server_count > 1 (each API process would keep its own responses)", self.responses_store)


def host_memory_gib() -> float | None:
    """Physical memory of this machine (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def _structured_outputs_config(value: str | dict | None) -> dict | None:
    """vLLM's --structured-outputs-config, checked: the keys whose values mean what pagedllm does or can do."""
    config = json_object(value, "structured_outputs_config")
    if config is None:
        return None
    flags = ("disable_fallback", "disable_any_whitespace", "disable_additional_properties", "enable_in_reasoning")
    known = ("backend", "reasoning_parser", *flags)
    unknown = sorted(set(config) - set(known))
    _check(not unknown, "structured_outputs_config", f"made of the keys {list(known)}", unknown)
    _check(config.get("backend", "auto") in ("auto", "xgrammar"), "structured_outputs_config.backend",
           "auto or xgrammar (structured output runs on xgrammar here)", config.get("backend"))
    for key in flags:
        _check(isinstance(config.get(key, False), bool), f"structured_outputs_config.{key}", "a bool",
               config.get(key))
    _check(not config.get("enable_in_reasoning"), "structured_outputs_config.enable_in_reasoning",
           "false: a constraint applies after the reasoning ends here", True)
    _check(not config.get("reasoning_parser"), "structured_outputs_config.reasoning_parser",
           "empty: the server's --reasoning-parser names the parser", config.get("reasoning_parser"))
    return config


def _check(ok: bool, name: str, limit: str, value):
    if not ok:
        raise ValueError(f"{name} must be {limit}, got {value!r}")


def config_fields(cls=EngineConfig):
    """(name, type, default, metadata) of every field of a config dataclass, for the CLI."""
    return [(f.name, f.type, f.default_factory() if f.default is MISSING else f.default, f.metadata)
            for f in fields(cls)]
