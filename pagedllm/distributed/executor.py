"""Who runs the tensor-parallel ranks. The engine core holds rank 0's ModelRunner; the executor starts ranks
1..N-1 and carries rank 0's runner calls to them (`TPRunner` below makes each call there first, then here).

    engine core (rank 0): Scheduler, KVCacheManager, TPRunner ── MultiprocExecutor.send ─► pipe ─► Worker rank r
                          ModelRunner (rank 0)  ◄─────── all-reduce / all-gather (gloo | NCCL) ───────►  ModelRunner

An executor is three calls and a death check: send(msg) to every worker, wait_ready(), shutdown(), check().
The Ray executor (ray_executor.py, `distributed_executor_backend="ray"`) implements the same with the same
`Worker` in Ray actors; ray is imported only then.

A worker that dies: the driver's next send, or the collective it waits in (gloo raises when a peer's socket
closes), or check() finds it and raises WorkerDiedError, which ends the engine (EngineCore lets it through). A
driver stuck where nothing raises (NCCL waits for a dead peer until its timeout) is ended by the monitor
thread: it logs the death and exits the process after DEATH_GRACE_SECONDS.
"""
import atexit
import logging
import multiprocessing
import os
import pickle
import socket
import threading
import time
from multiprocessing.connection import wait

import torch

from pagedllm.config import EngineConfig
from pagedllm.distributed.parallel_state import cpu_threads_per_rank, destroy_tp, init_tp, rank_device
from pagedllm.distributed.worker import OUT_OF_STEP_EXIT_CODE, pack_step, run_worker_process

logger = logging.getLogger("pagedllm")
# A dead rank ends the engine whichever way it is seen: the grace only lets a failed call (DEATH_CHECK_SECONDS
# to see the death) end it in order; past that, a user's requests would just wait longer for their error
DEATH_GRACE_SECONDS = 5.0
DEATH_CHECK_SECONDS = 3.0   # after a failed call: how long Ray may take to report a dead actor


class WorkerDiedError(RuntimeError):
    """A tensor-parallel worker process is gone: the engine cannot run a step without its part of the model."""


def exit_unless_noticed(executor) -> None:
    """After a worker's death: the engine gets DEATH_GRACE_SECONDS to notice it (a failed call) or close; if it
    does neither (stuck in a collective that waits for the dead rank), this process exits."""
    deadline = time.monotonic() + DEATH_GRACE_SECONDS
    while time.monotonic() < deadline:
        if executor.closing or executor.noticed:
            return
        time.sleep(0.1)
    logger.critical("the engine is stuck in a step with a dead tensor-parallel worker: exiting")
    os._exit(1)


class MultiprocExecutor:
    """Ranks 1..N-1 as spawned processes on this machine (rank r on cuda:r), one pipe each."""

    def __init__(self, config: EngineConfig, model, size: int):
        self.size = size
        self.init_method = f"tcp://127.0.0.1:{free_port()}"
        self.closing = self.noticed = False
        ctx = multiprocessing.get_context("spawn")
        self.procs, self.conns = [], []
        level = logging.getLogger("pagedllm").getEffectiveLevel()
        with _may_have_children():
            for rank in range(1, size):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=run_worker_process, name=f"pagedllm-tp-rank-{rank}", daemon=True,
                                   args=(config, model, rank, size, self.init_method, child, level))
                proc.start()
                child.close()   # only the worker holds its end: its death closes the pipe
                self.procs.append(proc)
                self.conns.append(parent)
        threading.Thread(target=self._monitor, name="pagedllm-tp-monitor", daemon=True).start()
        # at exit multiprocessing ends daemon workers (its atexit hook runs after this one): no death to report
        atexit.register(self._closing)

    def _closing(self):
        self.closing = True

    def wait_ready(self) -> list[int]:
        """Each worker's KV block count (equal to the driver's: they agreed on the minimum)."""
        counts = []
        for rank, (proc, conn) in enumerate(zip(self.procs, self.conns), start=1):
            while not conn.poll(0.5):
                self.check()
            msg = conn.recv()
            if msg[0] == "failed":
                raise RuntimeError(msg[1])
            counts.append(msg[1])
        return counts

    def startup_failure(self, seconds: float = 1.0) -> str | None:
        """A worker's ("failed", message), if one was sent (its start-up raised)."""
        for conn in self.conns:
            try:
                if conn.poll(seconds) and (msg := conn.recv())[0] == "failed":
                    return msg[1]
            except (EOFError, OSError):
                continue
        return None

    def driver_device(self, device: torch.device) -> torch.device:
        return device   # rank 0 on cuda:0 (the others on cuda:r)

    def send(self, msg: tuple) -> None:
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)   # once for all workers
        for rank, conn in enumerate(self.conns, start=1):
            try:
                conn.send_bytes(data)
            except OSError:   # BrokenPipeError: the worker's end closed, as it dies: let its exit be seen first,
                self.check(DEATH_CHECK_SECONDS)   # as after a failed call (1 s was not enough in CI, under load)
                raise WorkerDiedError(f"tensor-parallel rank {rank} is gone (its pipe closed)") from None

    def check(self, wait: float = 0.0) -> None:
        """wait: how long to wait for a worker to be seen dead, after a failed call. A killed worker's sockets
        close before its exit is reported, so the collective that failed on them can come first (seen in CI under
        load: rank 0 read "Connection reset by peer" while the worker still looked alive)."""
        # A ready sentinel is a worker that exited. is_alive() alone can still say alive then: the monitor thread
        # may be reaping it, and this thread's waitpid finds no child until the monitor stores the exit code (CI)
        ready = multiprocessing.connection.wait([p.sentinel for p in self.procs], timeout=wait)
        for rank, proc in enumerate(self.procs, start=1):
            if proc.sentinel in ready or not proc.is_alive():
                self.noticed = True
                code = _exit_code(proc)
                why = (": a step call failed on it and not on rank 0 (its log says which), so its collectives were "
                       "out of step" if code == OUT_OF_STEP_EXIT_CODE else "")
                raise WorkerDiedError(f"tensor-parallel worker rank {rank} (pid {proc.pid}) died with exit code "
                                      f"{code}{why}: the engine cannot run without its part of the model")

    def _monitor(self):
        """Waits for a worker's death; unless the engine notices and stops, ends this process after a grace."""
        wait([p.sentinel for p in self.procs])
        if self.closing:
            return
        dead = [f"rank {r} (pid {p.pid}, exit code {p.exitcode})"
                for r, p in enumerate(self.procs, start=1) if not p.is_alive()]
        logger.error("tensor-parallel worker died: %s", ", ".join(dead))
        exit_unless_noticed(self)

    def shutdown(self) -> None:
        self.closing = True
        atexit.unregister(self._closing)
        data = pickle.dumps(("shutdown",))
        for conn in self.conns:
            try:
                conn.send_bytes(data)
            except OSError:
                pass
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
        for conn in self.conns:
            conn.close()


def _exit_code(proc: multiprocessing.Process, seconds: float = 1.0) -> int | None:
    """A dead worker's exit code, once the thread reaping it (maybe the monitor's) has stored it."""
    deadline = time.monotonic() + seconds
    while proc.exitcode is None and time.monotonic() < deadline:
        time.sleep(0.005)
    return proc.exitcode


class TPRunner:
    """Rank 0's ModelRunner, each call repeated on the workers first (sent, not waited for): the engine core
    uses it as its runner. Attributes (num_blocks, kv_offload, ...) are the local runner's."""

    def __init__(self, runner, executor, tp, threads: int):
        self.runner, self.executor, self.tp = runner, executor, tp
        self.threads = threads   # this process's torch threads before the engine (restored at shutdown)
        self._steps = 0
        self.lora = None if runner.lora is None else MirroredLoRA(runner.lora, self._told)

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def add_lora_request(self, req_id: str, lora_request):
        """Rank 0 first (a bad adapter raises here and reaches no worker); each worker then holds its own slice
        of the same adapter for the request (the weights' fingerprint says they are the same files)."""
        self.runner.add_lora_request(req_id, lora_request)
        fingerprint = self.runner.lora.cpu[lora_request.lora_int_id].fingerprint
        self._told(("add_lora_request", req_id, lora_request, fingerprint))

    def _told(self, msg: tuple) -> None:
        """A change rank 0 made (and that cannot fail there now): the workers make it too."""
        self.executor.check()
        self.executor.send(msg)

    def drop_request(self, req_id: str):
        return self._mirrored(("drop_request", req_id), self.runner.drop_request, req_id)

    def clear_kv_disk(self):
        """reset_prefix_cache: every rank deletes its own block files (each rank has a directory of its own)."""
        self.runner.clear_kv_disk()
        self._told(("clear_kv_disk",))

    def profile(self, is_start: bool, prefix: str | None = None):
        """Every rank's profiler starts or stops, each writing its own trace file (vLLM's: each worker's)."""
        return self._mirrored(("profile", is_start, prefix), self.runner.profile, is_start, prefix)

    def reset_after_failed_step(self):
        return self._mirrored(("reset_after_failed_step",), self.runner.reset_after_failed_step)

    def execute_async(self, sched):
        self._steps += 1
        step = self._steps
        msg = ("execute", step, pack_step(sched))
        return MirroredPending(self._mirrored(msg, self.runner.execute_async, sched), step, self)

    def sample_constrained(self, pending: "MirroredPending", bitmask, mask_rows: list[int]):
        rows = bitmask[:max(mask_rows) + 1] if mask_rows else None   # the rows the workers need, not the table
        return self._mirrored(("sample_constrained", pending.step, rows, mask_rows), self.runner.sample_constrained,
                              pending.inner, bitmask, mask_rows)

    def _mirrored(self, msg: tuple, call, *args):
        self.executor.check()
        self.executor.send(msg)
        try:
            return call(*args)
        except Exception:
            self.executor.check(DEATH_CHECK_SECONDS)   # a collective failed because a rank is gone: that's the error
            raise

    def shutdown(self):
        self.executor.shutdown()
        destroy_tp(self.tp)
        torch.set_num_threads(self.threads)


class MirroredLoRA:
    """Rank 0's LoRAManager as the engine core sees it (TPRunner.lora): each change to its host adapters, once
    made here, is sent to the workers, whose managers make it in the same order between the same steps, each
    reading its slice of the adapter from disk (peft_loader). Reads (`load`, on the loader's threads) and
    queries stay here. A worker whose change fails (its read of the files failed) exits: its slots would
    serve other weights than rank 0's."""

    def __init__(self, manager, tell):
        self.manager, self._tell = manager, tell

    def __getattr__(self, name):
        return getattr(self.manager, name)

    def cached(self, req):
        lora = self.manager.cached(req)
        if lora is not None:   # its place in the LRU changed: the ranks evict the same adapters
            self._tell(("lora", "cached", req))
        return lora

    def get(self, req):
        lora = self.manager.get(req)
        self._tell(("lora", "get", req))
        return lora

    def add(self, req) -> bool:
        self.get(req)
        return True

    def insert(self, lora):
        have = self.manager.insert(lora)
        self._tell(("lora", "get", lora.request))
        return have

    def remove(self, lora_int_id: int, in_use: bool | None = None) -> bool:
        removed = self.manager.remove(lora_int_id, in_use)
        if removed:
            self._tell(("lora", "remove", lora_int_id, False))
        return removed

    def pin(self, lora_int_id: int) -> bool:
        pinned = self.manager.pin(lora_int_id)
        self._tell(("lora", "pin", lora_int_id))
        return pinned


class MirroredPending:
    """A launched step: result() has the workers read their copy of it, then reads rank 0's."""

    def __init__(self, inner, step: int, runner: TPRunner):
        self.inner, self.step, self._runner = inner, step, runner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def result(self):
        return self._runner._mirrored(("result", self.step), self.inner.result)


def build_runner(config: EngineConfig, hf_config, device: torch.device, dtype: torch.dtype, max_model_len: int):
    """The engine core's runner: a ModelRunner (tensor_parallel_size 1: nothing else starts), else rank 0's
    wrapped in a TPRunner, the workers started and ready."""
    from pagedllm.runner.model_runner import ModelRunner
    size = config.tensor_parallel_size
    if size == 1:
        return ModelRunner(config, hf_config, device, dtype, max_model_len)
    ray = config.distributed_executor_backend == "ray"
    if not ray and device.type == "cuda" and torch.cuda.device_count() < size:
        raise ValueError(f"tensor_parallel_size ({size}) must be at most the number of GPUs "
                         f"({torch.cuda.device_count()}) (distributed_executor_backend ray: GPUs of a Ray cluster)")
    _check_shapes(hf_config, size)   # before any process starts: a model that does not split is a ValueError
    if config.speculative is not None and config.speculative.method == "draft_model":   # sharded as the target
        from pagedllm.spec_decode.draft_model import draft_hf_config
        _check_shapes(draft_hf_config(config.speculative.model, hf_config), size, "speculative_config's model: ")
    from pagedllm.engine.resolved_model import ResolvedModel
    model = ResolvedModel(hf_config, device, dtype, max_model_len)
    if ray:
        from pagedllm.distributed.ray_executor import RayExecutor
        executor = RayExecutor(config, model, size)
    else:
        executor = MultiprocExecutor(config, model, size)
    threads = torch.get_num_threads()   # rank 0's share of the cores while the engine runs (the workers' own)
    if (share := cpu_threads_per_rank(device, size)) is not None:
        torch.set_num_threads(share)
    try:
        device = executor.driver_device(rank_device(device, 0))
        tp = init_tp(0, size, executor.init_method, device)
        runner = ModelRunner(config, hf_config, device, dtype, max_model_len, tp)
        executor.wait_ready()
    except BaseException as e:
        torch.set_num_threads(threads)
        why = executor.startup_failure()   # a worker's own error explains a collective that broke here
        executor.shutdown()
        destroy_tp_if_any()
        if why is None or not isinstance(e, Exception):
            raise
        raise RuntimeError(why) from e
    return TPRunner(runner, executor, tp, threads)


def _check_shapes(hf_config, size: int, whose: str = "") -> None:
    from pagedllm.distributed.layers import head_shard, split_size
    from pagedllm.distributed.parallel_state import TPGroup
    from pagedllm.models import get_model_class
    tp = TPGroup(0, size)
    refused = get_model_class(hf_config.architectures).tp_refused
    if refused and size > 1:
        raise ValueError(f"{whose}tensor_parallel_size {size}: {refused}")
    try:
        head_shard(hf_config.num_attention_heads,
                   getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads, tp)
        split_size(hf_config.intermediate_size, tp, "intermediate_size")
        if getattr(hf_config, "moe_intermediate_size", None):   # Qwen-MoE's experts (Mixtral's: intermediate_size)
            split_size(hf_config.moe_intermediate_size, tp, "moe_intermediate_size")
        _check_block_split(hf_config, size)
    except ValueError as e:
        raise ValueError(f"{whose}{e}") from None


def _check_block_split(hf_config, size: int) -> None:
    """A block-quantized checkpoint: every rank's share of each linear is whole blocks, the check each rank's
    loader makes (checkpoint_slice), made here for all ranks before any starts."""
    from pagedllm.distributed.layers import checkpoint_slice
    from pagedllm.distributed.parallel_state import TPGroup
    from pagedllm.layers.quantization.fp8_config import fp8_config
    from pagedllm.models.llama import head_dim
    quant = fp8_config(None, hf_config)
    if quant is None or quant.block_size is None:
        return
    for rank in range(size):
        for leaf in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
            checkpoint_slice(f"model.layers.0.{leaf}.weight_scale_inv", (), hf_config, head_dim(hf_config),
                             TPGroup(rank, size), quant.block_size)


def destroy_tp_if_any():
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on host ("": every interface, for a rendezvous that other nodes reach)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class _may_have_children:
    """multiprocessing refuses children to a daemon process, and the engine core process is one (it must die
    with the API process). Its workers are daemons too and die with it; the flag is lifted while they start."""

    def __enter__(self):
        self.config = multiprocessing.current_process()._config
        self.daemon = self.config.pop("daemon", None)

    def __exit__(self, *exc):
        if self.daemon is not None:
            self.config["daemon"] = self.daemon
