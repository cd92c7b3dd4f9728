"""`vllm serve` flags that pagedllm builds no field for: each takes the values that mean what pagedllm does
anyway, and refuses any other at start, naming the flag and why. A command line copied from vLLM's docs or a
model card then either runs as it would under vLLM, or stops at once saying what to change; no flag is
silently ignored."""
import argparse
import json
from dataclasses import dataclass
from typing import Callable

from pagedllm.field_types import json_object

# "the value was left out": a flag given on the command line is never this
_UNSET = None


@dataclass(frozen=True)
class VllmFlag:
    name: str                         # vLLM's spelling, without the leading --
    why: str                          # what pagedllm does instead: the refusal's reason
    takes: Callable[[object], bool]   # the values (as parsed) that mean what pagedllm does
    boolean: bool = False             # --x / --no-x (else a flag with one value)
    aliases: tuple[str, ...] = ()     # vLLM's short forms (-pp)
    nargs: str | None = None          # "+": several values after the flag (--cuda-graph-sizes 1 2 4)
    sets: dict | None = None          # config fields it sets when taken (--disable-log-stats)
    default: object = None            # vLLM's default where scripts compare it (args.data_parallel_size > 1):
                                      # EngineArgs' and its parser's (kwarg_dests), a value it takes; else None
    type: Callable | None = None      # argparse's type, where scripts compare the value (an int: -dp)

    @property
    def dest(self) -> str:
        return "vllm_" + self.name.replace("-", "_")


def _is(*values) -> Callable[[object], bool]:
    return lambda value: value in values


def _any(value) -> bool:
    return True


def _never(value) -> bool:
    return False


def _zero_counts(value: str) -> bool:
    """--limit-mm-per-prompt with every modality at 0 (text only): JSON, or vLLM's older image=0,video=0."""
    try:
        counts = json.loads(value)
    except ValueError:
        counts = dict(item.partition("=")[::2] for item in value.split(","))
    return isinstance(counts, dict) and all(str(v).strip() == "0" for v in counts.values())


def _empty_json_object(value: str) -> bool:
    try:
        return json.loads(value) == {}
    except ValueError:
        return False


_HUB_ONLY = "it picks what is downloaded from the Hugging Face Hub; pagedllm reads a local model directory, for " \
            "which vLLM ignores it too"
_MULTIMODAL = "multimodal inputs are not built: pagedllm serves text-only models (a limit of 0 for every modality " \
              "is taken)"
_NO_COMPILE = "pagedllm does not use torch.compile: it runs its own kernels, and replays CUDA graphs of the sizes " \
              "it picks (--enforce-eager turns them off)"

_WEIGHT_OFFLOAD = "offloading model weights to CPU memory is not built (--cpu-offload-gb 0); the KV cache's CPU " \
                  "tier is --kv-offloading-size"

VLLM_FLAGS = (
    VllmFlag("trust-remote-code", "pagedllm runs no code from a model directory: its architectures are built in, "
             "and another is refused by name", _any, boolean=True, default=False),
    VllmFlag("code-revision", _HUB_ONLY, _any),
    VllmFlag("tokenizer-mode", "pagedllm loads the model's Hugging Face tokenizer (auto, hf); mistral_common's, the "
             "slow and custom tokenizers are not built", _is("auto", "hf"), default="auto"),
    VllmFlag("config-format", "pagedllm reads the model's config.json (auto, hf); Mistral's params.json is not "
             "read", _is("auto", "hf")),
    VllmFlag("model-impl", "pagedllm runs its own model implementations (auto, vllm), not transformers' or "
             "another's", _is("auto", "vllm")),
    VllmFlag("runner", "pagedllm runs generative models only (auto, generate): pooling is not built",
             _is("auto", "generate")),
    VllmFlag("convert", "pagedllm runs generative models only (auto, none): converting one to a pooling model is "
             "not built", _is("auto", "none")),
    VllmFlag("pipeline-parallel-size", "pipeline parallelism is not built (1 is taken): split the model over "
             "GPUs with --tensor-parallel-size", _is("1"), aliases=("-pp",)),
    VllmFlag("data-parallel-size", "data parallelism is not built (1 is taken): run a server per GPU group "
             "behind a load balancer", lambda v: str(v) == "1", aliases=("-dp",), default=1, type=int),
    VllmFlag("enable-expert-parallel", "expert parallelism is not built: under --tensor-parallel-size every rank "
             "holds every expert (1/N of each), vLLM's default", _is(False), boolean=True),
    VllmFlag("disable-custom-all-reduce", "tensor-parallel ranks all-reduce through torch.distributed (NCCL) "
             "here, never a custom all-reduce", _any, boolean=True),
    VllmFlag("enable-chunked-prefill", "a prompt longer than a step's token budget (--max-num-batched-tokens) is "
             "always prefilled in chunks here; prefilling it whole is not built", _is(True), boolean=True),
    VllmFlag("async-scheduling", "each step is always scheduled while the one before runs on the device here",
             _is(True), boolean=True),
    VllmFlag("long-prefill-token-threshold", "a step's budget is not shared out among long prompts here (0 is "
             "taken)", _is("0")),
    VllmFlag("max-num-partial-prefills", "not built (1, vLLM's default, is taken)", _is("1")),
    VllmFlag("compilation-config", _NO_COMPILE, _never),
    VllmFlag("optimization-level", _NO_COMPILE, _never, aliases=("-O",)),
    VllmFlag("cuda-graph-sizes", _NO_COMPILE, _never, nargs="+"),
    VllmFlag("max-cudagraph-capture-size", _NO_COMPILE, _never),
    VllmFlag("calculate-kv-scales", "fp8 KV cache scales come from the checkpoint (k_scale, v_scale), else 1.0",
             _is(False), boolean=True),
    VllmFlag("kv-transfer-config", "moving KV between engines (disaggregated prefill, LMCache) is not built; the "
             "KV cache's own CPU and disk tiers: --kv-offloading-size, --kv-disk-dir", _never),
    VllmFlag("kv-events-config", "KV cache events are not published here", _never),
    VllmFlag("enable-sleep-mode", "sleep levels 1 and 2 (weights offloaded or discarded, KV cache freed) are not "
             "built; sleep(level=0), which pauses scheduling, needs no flag", _is(False), boolean=True),
    VllmFlag("limit-mm-per-prompt", _MULTIMODAL, _zero_counts),
    VllmFlag("mm-processor-kwargs", _MULTIMODAL, _never),
    VllmFlag("allowed-local-media-path", _MULTIMODAL, _is("")),
    VllmFlag("guided-decoding-backend", "structured output runs on xgrammar here (xgrammar, auto are taken)",
             _is("xgrammar", "auto")),
    VllmFlag("tool-parser-plugin", "tool parser plugins are not loaded: --tool-call-parser names a built-in one",
             _never),
    VllmFlag("disable-log-stats", "sets --log-stats-interval 0 (no statistics log lines; /metrics still answers)",
             _any, boolean=True, sets={"log_stats_interval": 0.0}),
    VllmFlag("disable-log-requests", "vLLM's old inverse of --enable-log-requests: no request log lines (the "
             "default)", _any, boolean=True, sets={"enable_log_requests": False}),
    VllmFlag("enable-log-outputs", "outputs are not logged here (--enable-log-requests logs the requests)",
             _is(False), boolean=True),
    VllmFlag("disable-frontend-multiprocessing", "the engine core always runs in its own process here",
             _is(False), boolean=True),
    VllmFlag("otlp-traces-endpoint", "OpenTelemetry tracing is not built", _never),
    VllmFlag("middleware", "ASGI middleware is not loaded by import path here", _never),
    VllmFlag("uds", "a Unix domain socket is not built: the server listens on --host and --port", _never),
    VllmFlag("ssl-ca-certs", "client certificates are not checked here (--ssl-keyfile and --ssl-certfile serve "
             "HTTPS)", _never),
    VllmFlag("ssl-cert-reqs", "client certificates are not checked here (0, none required, is taken)", _is("0")),
    VllmFlag("allowed-media-domains", _MULTIMODAL, _never, nargs="+"),
    VllmFlag("pooler-config", "pagedllm runs generative models only: pooling is not built", _never),
    VllmFlag("attention-config", "pagedllm picks its own attention kernels (torch on CPU, Triton or FlashAttention "
             "on CUDA)", _never),
    VllmFlag("logits-processors", "custom logits processor classes are not loaded: SamplingParams' own (penalties, "
             "logit_bias, allowed_token_ids, bad_words) are built in", _never, nargs="+"),
    VllmFlag("logprobs-mode", "logprobs and prompt logprobs are the model's raw log-softmax here (vLLM's default, "
             "raw_logprobs, is taken); the raw logits and the processed modes are not built", _is("raw_logprobs")),
    VllmFlag("use-fp64-gumbel", "the draw's random noise is float32 here; float64 noise is not built",
             _is(False), boolean=True),
    VllmFlag("enable-return-routed-experts", "the experts a token was routed to are not returned", _is(False),
             boolean=True),
    VllmFlag("prefix-caching-hash-algo", "block hashes are sha256 here (sha256, sha256_cbor are taken: the CBOR "
             "form matters only to KV events' readers, not built); xxhash is not built", _is("sha256", "sha256_cbor")),
    VllmFlag("max-parallel-loading-workers", "each rank reads the checkpoint a tensor at a time, so loading never "
             "holds a whole copy in CPU memory for this bound to limit", _any),
    VllmFlag("enable-server-load-tracking", "/load's count of requests in flight is not tracked (/load answers "
             "0, as vLLM's without the flag): /metrics has pagedllm:num_requests_running and "
             "pagedllm:num_requests_waiting", _is(False), boolean=True),
    VllmFlag("performance-mode", "pagedllm picks its own CUDA graph sizes and step defaults (balanced, vLLM's "
             "default, is taken): set --max-num-seqs and --max-num-batched-tokens for more throughput",
             _is("balanced")),
    VllmFlag("fully-sharded-loras", "under tensor parallelism LoRA is split as vLLM's default (A whole on "
             "column-parallel layers, B whole on row-parallel ones): vLLM's fully sharded layers compute the same "
             "products split another way", _any, boolean=True),
    VllmFlag("specialize-active-lora", "pagedllm captures each CUDA graph with and without the LoRA kernels, whose "
             "grid does not depend on how many adapters a step has", _any, boolean=True),
    VllmFlag("default-mm-loras", _MULTIMODAL + "; vLLM refuses it for a text-only model too (an empty {} is "
             "taken)", _empty_json_object),
    VllmFlag("enable-tower-connector-lora", "LoRA on a multimodal model's vision tower and connector: "
             + _MULTIMODAL, _is(False), boolean=True),
    VllmFlag("enable-mixed-moe-lora-format", "LoRA is refused for mixture-of-experts models", _is(False), boolean=True),
    VllmFlag("enable-moe-shared-loras", "LoRA is refused for mixture-of-experts models", _is(False), boolean=True),
    VllmFlag("offload-backend", _WEIGHT_OFFLOAD + " (auto is taken)", _is("auto")),
    VllmFlag("offload-group-size", _WEIGHT_OFFLOAD + " (0, off, is taken)", _is("0")),
    VllmFlag("offload-num-in-group", _WEIGHT_OFFLOAD + " (1, vLLM's default, is taken)", _is("1")),
    VllmFlag("offload-prefetch-step", _WEIGHT_OFFLOAD + " (1, vLLM's default, is taken)", _is("1")),
    VllmFlag("offload-params", _WEIGHT_OFFLOAD + " (none is taken)", _is([]), nargs="*"),
    VllmFlag("cpu-offload-params", _WEIGHT_OFFLOAD + " (none is taken)", _is([]), nargs="*"),
    VllmFlag("quantization-config", "a quantization's settings come from the checkpoint's config.json "
             "(quantization_config) or --quantization fp8 here; more are not built", _never),
    # flags vLLM has dropped (0.26 answers 'unrecognized arguments'), which older deployments still pass;
    # --rope-theta and --rope-scaling are --hf-overrides keys (vllm_argv.py), as vLLM said when it dropped them
    VllmFlag("num-scheduler-steps", "vLLM V0's multi-step scheduling, which vLLM removed with V0 (V1 schedules "
             "every step): here too each step is scheduled, the next while the last runs (1 is taken)", _is("1")),
    VllmFlag("task", "vLLM 0.26 has no --task: for embedding, reranking or reward models it says to use --runner "
             "pooling (with --convert embed, classify or reward to adapt a generative model); pagedllm runs "
             "generative models only (auto, generate are taken)", _is("auto", "generate")),
    VllmFlag("max-seq-len-to-capture", "vLLM removed it with V0; " + _NO_COMPILE, _never),
    VllmFlag("use-v2-block-manager", "vLLM made it a no-op when it removed its first block manager, then dropped "
             "it; pagedllm has one block manager", _any, boolean=True),
)


def add_vllm_flags(parser: argparse.ArgumentParser, kwarg_dests: bool = False):
    """kwarg_dests: each flag's value under vLLM's keyword name (trust_remote_code, as LLM(...) and
    EngineArgs(...) take it: check_vllm_kwargs), else under flag.dest (check_vllm_flags)."""
    group = parser.add_argument_group("vLLM flags not built here", "each takes only the values that mean what "
                                      "pagedllm does anyway; any other value stops the start, saying why")
    for flag in VLLM_FLAGS:
        names = ["--" + flag.name, *flag.aliases]
        action = argparse.BooleanOptionalAction if flag.boolean else "store"
        more = {} if flag.boolean else {"nargs": flag.nargs, "metavar": "VALUE", "type": flag.type}
        if kwarg_dests and flag.sets:
            action, more = _SetsFields, {**more, "sets": flag.sets}
        dest = flag.name.replace("-", "_") if kwarg_dests else flag.dest
        group.add_argument(*names, dest=dest, action=action, default=flag.default if kwarg_dests else _UNSET,
                           help=flag.why, **more)


class _SetsFields(argparse.BooleanOptionalAction):
    """A flag of kwarg_dests that sets config fields (--disable-log-stats: log_stats_interval 0) sets them in the
    parsed namespace too, where the parser has them: a field's default there would otherwise win over the flag
    in check_vllm_kwargs (a field given wins), which cannot tell a default from a value given."""

    def __init__(self, *args, sets: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.sets = sets

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        if getattr(namespace, self.dest):
            for name, value in self.sets.items():
                if hasattr(namespace, name):
                    setattr(namespace, name, value)


def check_vllm_flags(args: argparse.Namespace) -> dict:
    """The config fields the given vLLM flags set; a value pagedllm cannot honour is a ValueError naming it."""
    sets = {}
    for flag in VLLM_FLAGS:
        value = getattr(args, flag.dest)
        if value is _UNSET:
            continue
        if not flag.takes(value):
            shown = " ".join(value) if isinstance(value, list) else value
            given = ("--" if value else "--no-") + flag.name if flag.boolean else f"--{flag.name} {shown}"
            raise ValueError(f"{given}: {flag.why}")
        if value is not False:
            sets.update(flag.sets or {})
    return sets


def check_vllm_kwargs(kwargs: dict) -> tuple[dict, dict]:
    """LLM(**kwargs) as vLLM's LLM takes them: (the config fields they set, the other kwargs, for EngineConfig).
    A kwarg naming a flag of VLLM_FLAGS (vLLM's spelling, with underscores) is judged as the flag on the command
    line; None is vLLM's "left out". vLLM's old rope_theta and rope_scaling are hf_overrides keys, as their
    flags are (vllm_argv.py): they merge into an hf_overrides given too, and win over its keys, as there."""
    flags = {flag.name.replace("-", "_"): flag for flag in VLLM_FLAGS}
    sets, rest = {}, {}
    for name, value in _hf_override_kwargs(kwargs).items():
        flag = flags.get(name)
        if flag is None:
            rest[name] = value
            continue
        if value is None:
            continue
        if not flag.takes(_as_parsed(flag, value)):
            raise ValueError(f"LLM({name}={value!r:.100}): {flag.why}")
        if value is not False:
            sets.update(flag.sets or {})
    return sets, rest


# vLLM's old LLM arguments for a config.json value, dropped for hf_overrides (vLLM said so while it took them)
HF_OVERRIDE_KWARGS = ("rope_theta", "rope_scaling")


def _hf_override_kwargs(kwargs: dict) -> dict:
    """kwargs with rope_theta / rope_scaling (None: left out) moved into hf_overrides (a dict or its JSON)."""
    old = {name: kwargs[name] for name in HF_OVERRIDE_KWARGS if kwargs.get(name) is not None}
    rest = {name: value for name, value in kwargs.items() if name not in HF_OVERRIDE_KWARGS}
    if not old:
        return rest
    given = rest.get("hf_overrides")
    if isinstance(given, str):
        given = json_object(given, "hf_overrides")
    if given is not None and not isinstance(given, dict):
        raise ValueError(f"LLM({next(iter(old))}=...) merges into hf_overrides, which must then be a JSON object "
                         f"(a dict), got {type(given).__name__}")
    return {**rest, "hf_overrides": {**(given or {}), **old}}


def _as_parsed(flag: VllmFlag, value):
    """A Python value as argparse would give the flag's value: bool for a boolean flag, else text (a dict as
    its JSON, a list item by item)."""
    if flag.boolean:
        return value
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, (list, tuple, set, frozenset)):
        return [str(v) for v in value]
    return str(value)
