"""vLLM's EngineArgs and AsyncEngineArgs, for `AsyncLLM.from_engine_args(AsyncEngineArgs(model=..., ...))` as
scripts written for vLLM build their engine: the engine arguments LLM(...) takes (EngineConfig's fields, or vLLM's
spellings, each taken with vLLM's meaning or refused naming it: vllm_flags.py), and the ones of vLLM's AsyncLLM
itself. Their add_cli_args / from_cli_args give a script's own parser the flags of `pagedllm serve`'s engine."""
import argparse
import copy
import dataclasses

from pagedllm.cli import add_config_args, add_engine_args
from pagedllm.profiler import ProfilerConfig
from pagedllm.config import DEMO_MODEL, EngineConfig, ServerConfig, config_fields
from pagedllm.vllm_flags import HF_OVERRIDE_KWARGS, VLLM_FLAGS, add_vllm_flags, check_vllm_kwargs

_DEFAULTS = {name: default for name, _, default, _ in config_fields(EngineConfig)}

# vLLM's engine arguments that this project gives the AsyncLLM, not its EngineConfig (the name there)
ASYNC_LLM_ARGS = {"enable_log_requests": "log_requests"}


def _long_aliases() -> dict[str, str]:
    """vLLM's long names of config fields (kv_cache_memory_bytes: the alias --kv-cache-memory-bytes): name -> field."""
    return {alias[2:].replace("-", "_"): f.name for f in dataclasses.fields(EngineConfig)
            for alias in f.metadata.get("aliases", ()) if alias.startswith("--")}


def _engine_argument_fields() -> list[tuple]:
    """make_dataclass's fields of EngineArgs: model first, EngineConfig's other fields at their defaults; vLLM's
    long names of fields, its flags that have no field here (vllm_flags.py) and the old kwargs that become
    hf_overrides at None (vLLM's "left out"; a flag at vLLM's default where scripts compare it: VllmFlag.default).
    Mutable defaults are copied per object."""
    entries = [("model", str, dataclasses.field(default=DEMO_MODEL))]
    entries += [(name, object, dataclasses.field(default_factory=lambda d=default: copy.deepcopy(d)))
                for name, _, default, _ in config_fields(EngineConfig) if name != "model"]
    entries += [(name, object, dataclasses.field(default=None)) for name in _long_aliases()]
    entries += [(flag.name.replace("-", "_"), object, dataclasses.field(default=flag.default)) for flag in VLLM_FLAGS]
    return entries + [(name, object, dataclasses.field(default=None)) for name in HF_OVERRIDE_KWARGS]


class _EngineArgs:
    """EngineArgs(model, **engine_args): a dataclass, as vLLM's (`LLM(**dataclasses.asdict(engine_args))`), of
    every argument LLM(...) takes, given or at its default; checked when the engine is built, as vLLM's are."""

    def __setattr__(self, name: str, value):
        """vLLM's scripts set arguments after construction (`engine_args.max_model_len = 4096`): each is an engine
        argument, checked with the others when the engine is built; a name that is none is refused at once."""
        if name not in self.__dataclass_fields__:
            raise AttributeError(f"{type(self).__name__} has no engine argument {name!r}")
        if name == "profiler_config":   # vLLM's is a ProfilerConfig (scripts read .profiler): checked at once
            value = ProfilerConfig.parse(value)
        object.__setattr__(self, name, value)

    def __repr__(self) -> str:   # the arguments given: the others are their defaults
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)[1:]
                 if getattr(self, f.name) != _default(f)}
        return f"{type(self).__name__}(model={self.model!r}, **{given!r})"

    def create_engine_config(self, usage_context=None, headless: bool = False) -> EngineConfig:
        """vLLM's: the config of these arguments, which AsyncLLM.from_vllm_config builds on. Here an
        EngineConfig, which also has VllmConfig's paths scripts read (.model_config.max_model_len,
        .cache_config.block_size, .parallel_config, .scheduler_config: read-only views of what an AsyncLLM built
        on it runs with; config.py). The AsyncLLM's own arguments (ASYNC_LLM_ARGS) are not in it. usage_context
        names vLLM's usage report (not built: it changes nothing); headless (data-parallel ranks with no API
        server) is not built."""
        if headless:
            raise NotImplementedError("create_engine_config(headless=True): headless data-parallel engines are "
                                      "not built (one engine core, with its API server)")
        rest = {k: v for k, v in dataclasses.asdict(self).items() if k != "model" and k not in self._OWN_ARGS}
        return engine_config(self.model, rest)

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """The engine's flags of `pagedllm serve` (EngineConfig's fields, vLLM's flags judged as there), as
        vLLM's EngineArgs.add_cli_args; each flag's value is under the name EngineArgs(...) and LLM(...) take,
        so `LLM(**vars(parser.parse_args()))` works too. Any argparse parser; FlexibleArgumentParser
        (pagedllm.vllm_argv) also reads vLLM's --config FILE.yaml, --max_model_len and --json-flag.key forms."""
        add_engine_args(parser)
        add_vllm_flags(parser, kwarg_dests=True)
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace):
        """The arguments that add_cli_args's flags parsed into args (those the parser has), as vLLM's."""
        names = [name for name, *_ in config_fields(EngineConfig)] + list(cls._OWN_ARGS)
        names += [flag.name.replace("-", "_") for flag in VLLM_FLAGS]
        given = {name: getattr(args, name) for name in names if hasattr(args, name)}
        return cls(**given)


class _AsyncEngineArgs(_EngineArgs):

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser, async_args_only: bool = False) -> argparse.ArgumentParser:
        """EngineArgs' flags (unless async_args_only), and the AsyncLLM's own, serve's --enable-log-requests."""
        if not async_args_only:
            _EngineArgs.add_cli_args(parser)
        add_config_args(parser, ServerConfig, "AsyncLLM", only=tuple(ASYNC_LLM_ARGS))
        return parser

    def async_llm_kwargs(self) -> dict:
        """AsyncLLM's own arguments among them (None: left out, as vLLM reads it), checked as the server's flags."""
        return async_llm_kwargs({k: getattr(self, k) for k in ASYNC_LLM_ARGS})


EngineArgs = dataclasses.make_dataclass(
    "EngineArgs", _engine_argument_fields(), bases=(_EngineArgs,), repr=False,
    namespace={"_OWN_ARGS": {}, "__doc__": _EngineArgs.__doc__, "__module__": __name__})
AsyncEngineArgs = dataclasses.make_dataclass(
    "AsyncEngineArgs", [(name, object, dataclasses.field(default=None)) for name in ASYNC_LLM_ARGS],
    bases=(_AsyncEngineArgs, EngineArgs), repr=False,
    namespace={"_OWN_ARGS": ASYNC_LLM_ARGS, "__module__": __name__,
               "__doc__": "AsyncEngineArgs(model, **engine_args): EngineArgs', and the AsyncLLM's own "
                          "(ASYNC_LLM_ARGS; None: left out)."})


def async_llm_kwargs(values: dict) -> dict:
    """The engine's own arguments (ASYNC_LLM_ARGS: not EngineConfig's) among values, under the engine's names
    (None: left out, as vLLM reads it), checked as the server's flags. The AsyncLLM and LLM's engine take both."""
    kwargs = {ASYNC_LLM_ARGS[k]: values[k] for k in ASYNC_LLM_ARGS if values.get(k) is not None}
    if not isinstance(kwargs.get("log_requests", False), bool):
        raise ValueError(f"enable_log_requests must be a bool, got {kwargs['log_requests']!r:.50}")
    return kwargs


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def engine_config(model: str, engine_args: dict) -> EngineConfig:
    """EngineConfig(model, ...) of LLM-style arguments: vLLM's flags judged (vllm_flags.py), vLLM's long names of
    config fields (kv_cache_memory_bytes: the alias --kv-cache-memory-bytes) read as the fields'."""
    sets, fields = check_vllm_kwargs(engine_args)
    names = _long_aliases()   # one at None is left out (asdict(EngineArgs) gives it beside its field)
    fields = {names.get(k, k): v for k, v in fields.items() if not (k in names and v is None)}
    # a field given wins over a flag's setting, unless at its default (asdict(EngineArgs) gives every field: its
    # log_stats_interval 10 would undo disable_log_stats)
    fields = {k: v for k, v in fields.items() if not (k in sets and v == _DEFAULTS.get(k, sets[k]))}
    return EngineConfig(model=model, **{**sets, **fields})
