"""Engine configuration: the only place defaults live.

The CLI (`pagedllm.cli`) generates its flags from these fields; `help` in each field's metadata is the flag's
help text. Flag names follow vLLM's where the meaning is the same.
"""
from dataclasses import dataclass, field, fields
from pathlib import Path

DEMO_MODEL = str(Path(__file__).parent / "demo" / "stories260k")

_DTYPES = ("auto", "float32", "float16", "bfloat16")
_LOAD_FORMATS = ("auto", "safetensors", "dummy")


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class EngineConfig:
    model: str = _f(DEMO_MODEL, "model directory (HF layout: config.json, *.safetensors, tokenizer)")
    tokenizer: str | None = _f(None, "tokenizer directory (default: the model directory)")
    dtype: str = _f("auto", "weights and activations dtype; auto = the checkpoint's dtype on GPU, "
                            "float32 on CPU", choices=_DTYPES)
    device: str = _f("auto", "cpu, cuda or cuda:N; auto = cuda when available")
    load_format: str = _f("auto", "auto/safetensors read the checkpoint; dummy = random weights",
                          choices=_LOAD_FORMATS)
    seed: int = _f(0, "seed of the global random state (requests without their own seed)")
    block_size: int = _f(16, "tokens per KV cache block")
    max_model_len: int | None = _f(None, "longest prompt + output (default: the model's max_position_embeddings)")
    max_num_seqs: int = _f(256, "most requests running in one step")
    max_num_batched_tokens: int = _f(8192, "token budget of one step; longer prompts are prefilled in chunks")
    enable_prefix_caching: bool = _f(True, "reuse the KV of cached full blocks across requests (off: the n "
                                           "sequences of one request still share their prompt's blocks)")
    kv_cache_memory: int | None = _f(None, "bytes of KV cache (default on CPU: enough for max_num_seqs "
                                           "full-length requests, at most 4 GiB)")
    num_gpu_blocks_override: int | None = _f(None, "exact number of KV blocks (tests, debugging)")
    log_stats_interval: float = _f(10.0, "seconds between engine statistics log lines; 0 turns them off")

    def __post_init__(self):
        _check(self.dtype in _DTYPES, "dtype", f"one of {_DTYPES}", self.dtype)
        _check(self.load_format in _LOAD_FORMATS, "load_format", f"one of {_LOAD_FORMATS}", self.load_format)
        _check(self.block_size in (1, 2, 4, 8, 16, 32, 64, 128), "block_size",
               "a power of two from 1 to 128", self.block_size)
        _check(self.max_num_seqs >= 1, "max_num_seqs", ">= 1", self.max_num_seqs)
        _check(self.max_num_batched_tokens >= 1, "max_num_batched_tokens", ">= 1", self.max_num_batched_tokens)
        _check(self.max_model_len is None or self.max_model_len >= 1, "max_model_len", ">= 1",
               self.max_model_len)
        _check(self.kv_cache_memory is None or self.kv_cache_memory > 0, "kv_cache_memory", "> 0 bytes",
               self.kv_cache_memory)
        _check(self.num_gpu_blocks_override is None or self.num_gpu_blocks_override >= 1,
               "num_gpu_blocks_override", ">= 1", self.num_gpu_blocks_override)


@dataclass
class ServerConfig:
    """`pagedllm serve`: the HTTP side (engine flags come from EngineConfig)."""
    host: str = _f("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = _f(8000, "port to listen on")
    api_key: str | None = _f(None, "require `Authorization: Bearer KEY` on /v1 routes (default: the "
                                   "PAGEDLLM_API_KEY environment variable; unset = no key)")
    served_model_name: str | None = _f(None, "model name in the API (default: the model argument)")
    chat_template: str | None = _f(None, "chat template (a file or the template text) when the tokenizer has "
                                         "none, or to replace its own")
    max_waiting_queue_length: int | None = _f(None, "refuse new requests with 503 while this many sequences "
                                                    "wait for their first step (default: no bound)")
    log_level: str = _f("info", "log level of pagedllm and uvicorn", choices=("debug", "info", "warning", "error"))

    def __post_init__(self):
        _check(0 <= self.port < 65536, "port", "in [0, 65535]", self.port)
        _check(self.max_waiting_queue_length is None or self.max_waiting_queue_length >= 1,
               "max_waiting_queue_length", ">= 1", self.max_waiting_queue_length)


def _check(ok: bool, name: str, limit: str, value):
    if not ok:
        raise ValueError(f"{name} must be {limit}, got {value!r}")


def config_fields(cls=EngineConfig):
    """(name, type, default, metadata) of every field of a config dataclass, for the CLI."""
    return [(f.name, f.type, f.default, f.metadata) for f in fields(cls)]
