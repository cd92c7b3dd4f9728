"""A tensor-parallel worker: ranks 1..N-1, each a ModelRunner that repeats the calls rank 0's runner makes.

`Worker.handle(msg)` is the whole protocol, whatever carries the messages (a pipe here; a Ray actor's method
call for a Ray executor). Messages, in the driver's order:
    ("execute", step, SchedulerOutput)    ("sample_constrained", step, bitmask rows, mask_rows)
    ("result", step)                      ("reset_after_failed_step",)
    ("drop_request", req_id)              ("shutdown",)
    ("lora", manager method, *args)       ("add_lora_request", req_id, LoRARequest, fingerprint)
    ("clear_kv_disk",)                    ("profile", is_start, prefix)
A step's SchedulerOutput carries its KV tier copies (runner/kv_offload.py): each rank moves its own share.
The worker's steps launch and read like the driver's (execute of N+1 before result of N), so its device keeps
the next step queued too; its sampled ids equal the driver's (same all-gathered logits, same seeds) and
stay here: only rank 0 reports outputs.

A step call that raises here (execute, sample_constrained, result) must have raised on the driver too: its
engine then fails the step's requests and its next message is ("reset_after_failed_step",). Any other next
message, or none within RESET_WAIT_SECONDS (the driver waits in a collective this rank never joined), means
the call failed here alone (an OOM on this GPU): this rank's collectives and state are out of step with the
others', so it exits (OUT_OF_STEP_EXIT_CODE), and the engine ends as it does when a worker dies, naming why.
So does a LoRA call that fails here: it succeeded on the driver (executor.MirroredLoRA sends it after), and
this rank's slots would hold other weights than the others' (its read of the adapter failed, or the files
changed on disk since the driver read them: the fingerprints differ).
"""
import atexit
import dataclasses
import logging
import os
import pickle
import signal
import sys
import threading
from multiprocessing.connection import Connection

from pagedllm.config import EngineConfig

logger = logging.getLogger("pagedllm")
RESET_WAIT_SECONDS = 10.0
OUT_OF_STEP_EXIT_CODE = 3
_STEP_CALLS = ("execute", "sample_constrained", "result")


class Worker:
    def __init__(self, config: EngineConfig, model, rank: int, size: int, init_method: str, device=None):
        """model: the driver's ResolvedModel (hf_config, device, dtype, max_model_len): every rank the same.
        device: this rank's device; None: cuda:rank (one process per local GPU; a Ray actor that sees one GPU
        passes cuda:0)."""
        from pagedllm.distributed.parallel_state import init_tp, rank_device
        import torch
        from pagedllm.runner.model_runner import ModelRunner
        torch.manual_seed(config.seed)   # as EngineCore seeds rank 0's process
        device = device if device is not None else rank_device(model.device, rank)
        self.tp = init_tp(rank, size, init_method, device)
        self.runner = ModelRunner(config, model.hf_config, device, model.dtype, model.max_model_len, self.tp)
        self.pending = {}   # step -> PendingOutput, launched and not read yet
        self._failed: tuple[str, threading.Timer] | None = None   # a step call that raised, until the reset

    def handle(self, msg: tuple) -> None:
        """One call of the driver's runner. One that raises here raised there too (the same data, the same
        code): the driver fails its requests, the worker logs it and goes on like the driver, once the driver's
        reset confirms it (see the module doc)."""
        kind = msg[0]
        if self._failed is not None:
            what, timer = self._failed
            timer.cancel()
            self._failed = None
            if kind != "reset_after_failed_step":
                self._exit_out_of_step(f"{what}, and the driver's next call was {kind!r}, not the reset")
        try:
            if kind == "execute":
                self.pending[msg[1]] = self.runner.execute_async(unpack_step(msg[2]))
            elif kind == "result":
                self._drop_unread(msg[1])
                pending = self.pending.pop(msg[1], None)
                if pending is not None:
                    pending.result()
            elif kind == "sample_constrained":
                self.runner.sample_constrained(self.pending[msg[1]], msg[2], msg[3])
            elif kind == "drop_request":
                self.runner.drop_request(msg[1])
            elif kind == "clear_kv_disk":
                self.runner.clear_kv_disk()
            elif kind == "profile":   # this rank's trace: a failure here is logged, the steps go on
                self.runner.profile(msg[1], msg[2])
            elif kind in ("lora", "add_lora_request"):
                self._lora_call(msg)
            elif kind == "reset_after_failed_step":   # the step in flight before it is still read next
                self.runner.reset_after_failed_step()
            else:
                raise ValueError(f"unknown worker message {kind!r}")
        except Exception as e:
            if kind == "sample_constrained":
                self.pending.pop(msg[1], None)
            logger.exception("tensor-parallel rank %d: %s failed (the driver fails the same call)", self.tp.rank,
                             kind)
            if kind in _STEP_CALLS:
                what = f"{kind} of step {msg[1]} raised here ({type(e).__name__}: {e})"
                timer = threading.Timer(RESET_WAIT_SECONDS, self._exit_out_of_step,
                                        (f"{what}, and no reset came from the driver in {RESET_WAIT_SECONDS:g} s",))
                timer.daemon = True
                timer.start()
                self._failed = (what, timer)

    def _lora_call(self, msg: tuple) -> None:
        try:
            if msg[0] == "lora":
                getattr(self.runner.lora, msg[1])(*msg[2:])
                return
            _, req_id, req, fingerprint = msg
            self.runner.add_lora_request(req_id, req)
            if self.runner.lora.cpu[req.lora_int_id].fingerprint != fingerprint:
                raise ValueError(f"LoRA adapter {req.lora_name!r} ({req.lora_path}) is not the one rank 0 "
                                 f"loaded (its files changed since)")
        except Exception as e:
            self._exit_out_of_step(f"a LoRA call that succeeded on rank 0 failed here: {type(e).__name__}: {e}")

    def _exit_out_of_step(self, why: str) -> None:
        logger.critical("tensor-parallel rank %d is out of step with rank 0: %s. Exiting: the engine cannot run "
                        "without this rank", self.tp.rank, why)
        logging.shutdown()
        os._exit(OUT_OF_STEP_EXIT_CODE)

    def _drop_unread(self, step: int) -> None:
        """The driver reads steps in order: one before `step` still here failed there and is never read."""
        for old in [s for s in self.pending if s < step]:
            del self.pending[old]

    def shutdown(self) -> None:
        from pagedllm.distributed.parallel_state import destroy_tp
        if self._failed is not None:
            self._failed[1].cancel()
        self.runner.profiler.shutdown()   # a profile still running writes its trace
        destroy_tp(self.tp)


def run_worker_process(config: EngineConfig, model, rank: int, size: int, init_method: str, conn: Connection,
                       log_level: int) -> None:
    """The multiprocess executor's worker main: build, say ready (or why not), then serve the pipe until the
    driver says shutdown or is gone (EOF)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the driver stops the workers
    logging.basicConfig(level=log_level, format=f"%(levelname)s %(name)s (TP rank {rank}): %(message)s")
    from pagedllm.distributed.parallel_state import cpu_threads_per_rank
    if (threads := cpu_threads_per_rank(model.device, size)) is not None:
        import torch
        torch.set_num_threads(threads)
    try:
        worker = Worker(config, model, rank, size, init_method)
    except Exception as e:
        logger.exception("tensor-parallel rank %d failed to start", rank)
        conn.send(("failed", f"tensor-parallel rank {rank}: {type(e).__name__}: {e}"))
        return
    conn.send(("ready", worker.runner.num_blocks))
    try:
        while (msg := pickle.loads(conn.recv_bytes()))[0] != "shutdown":
            worker.handle(msg)
    except (EOFError, OSError):   # the driver is gone
        return
    worker.shutdown()
    # The exit handlers run (the disk tier's queued writes, logging's flush); the interpreter's teardown of
    # torch's modules does not: the OS frees them, and the driver's shutdown waited ~1 s for it on 2 CPU cores
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def pack_step(sched):
    """A SchedulerOutput whose cached requests (one a running request: most of a decode step) travel as three
    lists: 512 of them pickle in ~0.1 ms instead of ~0.7 ms as dataclass objects, on the driver's step loop."""
    c = sched.cached_reqs
    columns = ([r.req_id for r in c], [r.new_block_ids for r in c], [r.num_computed_tokens for r in c])
    return dataclasses.replace(sched, cached_reqs=columns)


def unpack_step(sched):
    from pagedllm.core.messages import CachedRequestData
    sched.cached_reqs = [CachedRequestData(*row) for row in zip(*sched.cached_reqs)]
    return sched
