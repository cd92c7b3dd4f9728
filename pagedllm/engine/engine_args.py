"""vLLM's EngineArgs and AsyncEngineArgs, for `AsyncLLM.from_engine_args(AsyncEngineArgs(model=..., ...))` as
scripts written for vLLM build their engine: the engine arguments LLM(...) takes (EngineConfig's fields, or vLLM's
spellings, each taken with vLLM's meaning or refused naming it: vllm_flags.py), and the ones of vLLM's AsyncLLM
itself. Their add_cli_args / from_cli_args give a script's own parser the flags of `pagedllm serve`'s engine."""
import argparse
import dataclasses

from pagedllm.cli import add_config_args, add_engine_args
from pagedllm.config import DEMO_MODEL, EngineConfig, ServerConfig, config_fields
from pagedllm.vllm_flags import VLLM_FLAGS, add_vllm_flags, check_vllm_kwargs

_DEFAULTS = {name: default for name, _, default, _ in config_fields(EngineConfig)}

# vLLM's engine arguments that this project gives the AsyncLLM, not its EngineConfig (the name there)
ASYNC_LLM_ARGS = {"stream_interval": "stream_interval", "enable_log_requests": "log_requests"}


class EngineArgs:
    """EngineArgs(model, **engine_args): checked when the engine is built, as vLLM's are."""
    _OWN_ARGS: dict[str, str] = {}   # arguments that go elsewhere than EngineConfig (AsyncEngineArgs')

    def __init__(self, model: str = DEMO_MODEL, **engine_args):
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "engine_args", engine_args)

    def __setattr__(self, name: str, value):
        """vLLM's scripts set arguments after construction (`engine_args.max_model_len = 4096`): each is an
        engine argument, checked with the others when the engine is built (an instance attribute was ignored)."""
        if name in ("model", "engine_args"):
            object.__setattr__(self, name, value)
        else:
            self.engine_args[name] = value

    def __getattr__(self, name: str):
        """An argument given (at construction or set since), else EngineConfig's default for it, as vLLM's
        dataclass reads (`engine_args.max_model_len` is None until set: the model's own, decided at build)."""
        engine_args = self.__dict__.get("engine_args", {})
        if name in engine_args:
            return engine_args[name]
        if name in _DEFAULTS:
            return _DEFAULTS[name]
        raise AttributeError(f"{type(self).__name__} has no {name!r}: not given, and not an engine argument here "
                             f"(create_engine_config() holds the values used)")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model!r}, **{self.engine_args!r})"

    def create_engine_config(self, usage_context=None, headless: bool = False) -> EngineConfig:
        """The EngineConfig of these arguments (vLLM's name; here EngineConfig, not vLLM's VllmConfig).
        usage_context names vLLM's usage report (not built: it changes nothing); headless (data-parallel ranks
        with no API server) is not built."""
        if headless:
            raise NotImplementedError("create_engine_config(headless=True): headless data-parallel engines are "
                                      "not built (one engine core, with its API server)")
        rest = {k: v for k, v in self.engine_args.items() if k not in self._OWN_ARGS}
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


class AsyncEngineArgs(EngineArgs):
    """AsyncEngineArgs(model, **engine_args): EngineArgs', and the AsyncLLM's own (ASYNC_LLM_ARGS)."""
    _OWN_ARGS = ASYNC_LLM_ARGS

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser, async_args_only: bool = False) -> argparse.ArgumentParser:
        """EngineArgs' flags (unless async_args_only), and the AsyncLLM's own, serve's --enable-log-requests and
        --stream-interval."""
        if not async_args_only:
            EngineArgs.add_cli_args(parser)
        add_config_args(parser, ServerConfig, "AsyncLLM", only=tuple(ASYNC_LLM_ARGS))
        return parser

    def async_llm_kwargs(self) -> dict:
        """AsyncLLM's own arguments among them (None: left out, as vLLM reads it), checked as the server's flags."""
        kwargs = {ASYNC_LLM_ARGS[k]: v for k, v in self.engine_args.items() if k in ASYNC_LLM_ARGS and v is not None}
        interval = kwargs.get("stream_interval", 1)
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"stream_interval must be an integer >= 1 (tokens per streamed output), got "
                             f"{interval!r:.50}")
        return kwargs


def engine_config(model: str, engine_args: dict) -> EngineConfig:
    """EngineConfig(model, ...) of LLM-style arguments: vLLM's flags judged (vllm_flags.py), vLLM's long names of
    config fields (kv_cache_memory_bytes: the alias --kv-cache-memory-bytes) read as the fields'."""
    sets, fields = check_vllm_kwargs(engine_args)
    names = {alias[2:].replace("-", "_"): f.name for f in dataclasses.fields(EngineConfig)
             for alias in f.metadata.get("aliases", ()) if alias.startswith("--")}
    return EngineConfig(model=model, **{**sets, **{names.get(k, k): v for k, v in fields.items()}})   # a field wins
