"""vLLM's --profiler-config: torch.profiler over the engine's steps between start_profile() and stop_profile().

Each rank's profiler runs in the process that runs its model: the caller's for LLM, the engine core process for
AsyncLLM and the server, a worker process for tensor-parallel ranks 1..N-1. Each writes its own trace file with
torch's tensorboard_trace_handler into torch_profiler_dir, named as vLLM names them:
`[PREFIX_]dp0_pp0_tp<rank>_dcp0_ep0_rank<rank>.<time ns>.pt.trace.json[.gz]` (only tensor parallelism is built,
so the other dimensions are 0), and the profiler's table of its operators into profiler_out_<rank>.txt. AsyncLLM
also traces its own process's CPU work (`<host>_<pid>.async_llm...`), unless ignore_frontend.

No torch import at module level: config.py imports ProfilerConfig.
"""
import dataclasses
import logging
import os
import socket
from dataclasses import dataclass

from pagedllm.field_types import check_types, json_object

logger = logging.getLogger("pagedllm")

_KINDS = ("torch", "cuda")
ENABLE_HINT = ("set --profiler-config to enable profiling, e.g. '--profiler-config.profiler=torch "
               "--profiler-config.torch_profiler_dir=DIR' (LLM(profiler_config={'profiler': 'torch', "
               "'torch_profiler_dir': DIR}))")
_NO_SCHEDULE = ("the profiler schedule (wait/warmup/active iterations) is not built: use delay_iterations and "
                "max_iterations")
# vLLM's keys whose non-default values ask for what is not built -> why (the default is taken)
_NOT_BUILT = {
    "warmup_iterations": (0, _NO_SCHEDULE),
    "wait_iterations": (0, _NO_SCHEDULE),
    "capture_torch_profiler": (False, "tracing CUDA graph capture is not built"),
    "detailed_trace_annotation": (False, "the roofline annotations (sq, sk, sqsq, sqsk) of each step are not "
                                         "built: a step is annotated with its requests and tokens"),
}


@dataclass(frozen=True)
class ProfilerConfig:
    """vLLM's ProfilerConfig keys that are built here (the others: _NOT_BUILT, refused away from their default)."""
    profiler: str | None = None              # torch or cuda (cudaProfilerStart/Stop, for nsys); None: off
    torch_profiler_dir: str = ""             # required with torch (made absolute)
    torch_profiler_with_stack: bool = True
    torch_profiler_with_flops: bool = False
    torch_profiler_use_gzip: bool = True
    torch_profiler_dump_cuda_time_total: bool = True   # the table of operators by CUDA time, on a GPU
    torch_profiler_record_shapes: bool = False
    torch_profiler_with_memory: bool = False
    ignore_frontend: bool = False            # AsyncLLM: no trace of its own process
    delay_iterations: int = 0                # steps after start_profile before the profiler starts
    max_iterations: int = 0                  # steps profiled at most (0: until stop_profile)
    active_iterations: int = 5               # vLLM's schedule's: it applies with warmup or wait iterations only

    @classmethod
    def parse(cls, value) -> "ProfilerConfig":
        """A JSON object (text, as --profiler-config gives it), a dict, a ProfilerConfig or None (off)."""
        if value is None or isinstance(value, cls):
            return value or cls()
        value = {k: os.fspath(v) if isinstance(v, os.PathLike) else v
                 for k, v in json_object(value, "profiler_config").items()}
        for key, (default, why) in _NOT_BUILT.items():
            if key in value and value.pop(key) != default:
                raise ValueError(f"profiler_config.{key}: {why} (only {default!r} is taken)")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(f"profiler_config.{unknown[0]} is not a profiler_config key (keys: {known})")
        config = cls(**value)
        check_types(config, "profiler_config.")
        config._check()
        return config

    def _check(self):
        def bad(key: str, limit: str):
            raise ValueError(f"profiler_config.{key} must be {limit}, got {getattr(self, key)!r}")
        if self.profiler not in (None, *_KINDS):
            bad("profiler", f"None or one of {_KINDS}")
        if self.profiler == "torch" and not self.torch_profiler_dir:
            bad("torch_profiler_dir", "set when profiler is torch (where the traces go)")
        if self.torch_profiler_dir and self.profiler != "torch":
            bad("torch_profiler_dir", "empty unless profiler is torch")
        if "://" in self.torch_profiler_dir:
            bad("torch_profiler_dir", "a local directory (vLLM's URIs, gs:// and others, are not built)")
        for key, least in (("delay_iterations", 0), ("max_iterations", 0), ("active_iterations", 1)):
            if getattr(self, key) < least:
                bad(key, f">= {least}")
        if self.torch_profiler_dir:
            object.__setattr__(self, "torch_profiler_dir",
                               os.path.abspath(os.path.expanduser(self.torch_profiler_dir)))

    @property
    def enabled(self) -> bool:
        return self.profiler is not None


def not_enabled() -> RuntimeError:
    return RuntimeError(f"Profiling is not enabled: {ENABLE_HINT}")


class RankProfiler:
    """One rank's profiler (ModelRunner.profiler): start/stop from the engine, step() around each step of the
    runner, which counts delay_iterations and max_iterations. A torch profiler is made at each start, so each
    start_profile ... stop_profile writes a trace of its own, named with that start's prefix."""

    def __init__(self, config: ProfilerConfig, rank: int, device):
        if config.profiler == "cuda" and device.type != "cuda":
            raise ValueError(f"profiler_config.profiler cuda (cudaProfilerStart/Stop) needs a CUDA device, the "
                             f"model runs on {device}")
        self.config, self.rank, self.device = config, rank, device
        self.active = False      # between start() and stop()
        self.running = None      # the torch profiler recording now (True for cuda's)
        self._prefix: str | None = None
        self._steps = 0          # steps since start()
        self._profiled = 0       # steps recorded

    def start(self, prefix: str | None = None):
        if self.active:   # vLLM's: a second start while one is active is ignored
            logger.info("start_profile while the profiler is active: ignored")
            return
        self.active, self._prefix, self._steps, self._profiled = True, prefix, 0, 0
        if self.config.delay_iterations == 0:
            self._start()

    def stop(self):
        if not self.active:
            logger.warning("stop_profile with no profile started: nothing to stop")
            return
        self.active = False
        if self.running is not None:
            self._stop()

    def step(self, sched):
        """A context around one step of the runner: the delayed start, the step's annotation, the limit."""
        if not self.active or sched.is_empty:   # steps that run something count, not the empty ones
            return _NULL
        self._steps += 1
        if self.running is None and self._steps == self.config.delay_iterations:
            self._start()
        if self.running is None:
            return _NULL
        self._profiled += 1
        if self.config.max_iterations and self._profiled > self.config.max_iterations:
            logger.info("profiler: max_iterations (%d) steps profiled, stopped", self.config.max_iterations)
            self._stop()
            return _NULL
        if self.config.profiler == "cuda":
            return _NULL
        import torch
        return torch.profiler.record_function(f"execute_{len(sched.num_scheduled_tokens)}_requests_"
                                              f"{sched.total_num_scheduled_tokens}_tokens")

    def shutdown(self):
        if self.running is not None:
            self._stop()

    def _start(self):
        import torch
        if self.config.profiler == "cuda":
            torch.cuda.profiler.start()
            self.running = True
            return
        name = f"dp0_pp0_tp{self.rank}_dcp0_ep0_rank{self.rank}"
        self.running = new_torch_profiler(self.config, f"{self._prefix}_{name}" if self._prefix else name,
                                          cuda=self.device.type == "cuda")
        self.running.start()
        if self.rank == 0:
            logger.info("torch profiler started: traces go to %s", self.config.torch_profiler_dir)

    def _stop(self):
        running, self.running = self.running, None
        if self.config.profiler == "cuda":
            import torch
            torch.cuda.profiler.stop()
            return
        running.stop()   # the trace handler writes the trace file
        cuda = self.device.type == "cuda"
        if cuda and not self.config.torch_profiler_dump_cuda_time_total:
            return
        try:
            table = running.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                                 row_limit=100 if cuda else 50)
        except Exception as e:  # noqa: BLE001 - torch 2.13 at times reads an event name it cannot decode
            logger.warning("profiler: the trace is written; its table of operators failed: %s", e)
            return
        path = os.path.join(self.config.torch_profiler_dir, f"profiler_out_{self.rank}.txt")
        with open(path, "w") as f:
            print(table, file=f)
        if self.rank == 0:
            logger.info("torch profiler stopped: trace and %s written", path)


def new_torch_profiler(config: ProfilerConfig, worker_name: str, cuda: bool):
    import torch
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    return torch.profiler.profile(
        activities=activities, record_shapes=config.torch_profiler_record_shapes,
        profile_memory=config.torch_profiler_with_memory, with_stack=config.torch_profiler_with_stack,
        with_flops=config.torch_profiler_with_flops,
        on_trace_ready=torch.profiler.tensorboard_trace_handler(config.torch_profiler_dir, worker_name=worker_name,
                                                                use_gzip=config.torch_profiler_use_gzip))


def frontend_profiler(config: ProfilerConfig):
    """AsyncLLM's trace of its own process (CPU), vLLM's: with profiler torch unless ignore_frontend; else None."""
    if config.profiler != "torch" or config.ignore_frontend:
        return None
    return FrontendProfiler(config)


class FrontendProfiler:
    def __init__(self, config: ProfilerConfig):
        self.config, self.running = config, None

    def start(self):
        if self.running is None:
            self.running = new_torch_profiler(self.config, f"{socket.gethostname()}_{os.getpid()}.async_llm",
                                              cuda=False)
            self.running.start()

    def stop(self):
        running, self.running = self.running, None
        if running is not None:
            running.stop()


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_NULL = _Null()
