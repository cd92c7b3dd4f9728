"""The engine core in a process of its own, and the API process's handle on it.

Why a process: the step loop is Python (scheduling, input building, kernel launches), and so is the
server's HTTP work (parsing, tokenizing, detokenizing, JSON and SSE). In one process they would share the
GIL, and every chunk sent to a client would be time taken from the next step. Here the core process only
schedules, runs the model and sends token ids; the API process does everything else.

    API process                                   core process (spawned: safe with CUDA and OpenMP)
      CoreClient.send(msg)  ── writer thread ──►  pipe ──►  drained between steps
      reader callback (event loop)  ◄──────────── pipe ◄──  ("outputs", [EngineCoreOutput], StepStats)

Messages are tuples: ("add", [EngineCoreRequest]), ("finish", [child ids], RequestStatus), ("release", [ids]),
("stats",), ("lora", call id, name, *args), ("shutdown",) in; ("ready", num_blocks, startup info) or ("failed",
message) once, then ("outputs", [EngineCoreOutput field values], StepStats) and ("stats", SchedulerStats) out, in
order, and ("lora_reply", call id, result) when a LoRA call is done (an adapter's read holds no other message).
The writer thread keeps the event loop from blocking on a full pipe (a burst of long prompts) while the core is
itself blocked sending outputs: that would deadlock.

Faults: once ready, a thread of the core process sends ("heartbeat", seconds since the step loop last came
round) every HEARTBEAT_INTERVAL, whatever the loop is doing. A stopped or frozen process sends none; a long
step (a large prefill, a kernel compiling) sends beats whose stall grows; the API process judges both
(AsyncLLM.unhealthy_reason: heartbeat_timeout for silence, step_timeout for a stall). The core ignores SIGINT: a
Ctrl-C reaches the whole terminal process group, and the API process stops the core itself through the pipe.
The core's life is tied to the pipe: it returns when the API process is gone.
"""
import gc
import logging
import multiprocessing
import queue
import signal
import threading
import time
from multiprocessing.connection import Connection

from pagedllm.config import EngineConfig
from pagedllm.metrics import StatsLogger, StepStats

logger = logging.getLogger("pagedllm")
HEARTBEAT_INTERVAL = 1.0   # seconds between heartbeats of the core process


def run_engine_core(config: EngineConfig, conn: Connection, log_level: int):
    """The core process's main: build the engine core, then step while there is work."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s (engine core): %(message)s")
    start = time.perf_counter()
    try:
        from pagedllm.engine.core import EngineCore
        from pagedllm.engine.engine import resolve_model
        model = resolve_model(config)
        core = EngineCore(config, model.hf_config, model.device, model.dtype, model.max_model_len)
    except Exception as e:   # reported to the API process, which exits with the message
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    freeze_gc()
    conn = _SharedConn(conn)
    conn.send(("ready", core.runner.num_blocks, _startup_info(config, core.runner, time.perf_counter() - start)))
    if not config.skip_tokenizer_init:
        core.structured.pool.warm_up()   # a server's first constrained request then pays only its compile
    stats_logger = StatsLogger(config.log_stats_interval)
    pulse = _Pulse(conn)
    lora_calls = _LoRACalls(core, conn)
    try:
        while True:
            # Idle: wait for a message (a heartbeat's time at most). Busy: take what has arrived, then step.
            while conn.poll(0 if core.has_unfinished_requests() else HEARTBEAT_INTERVAL):
                if not _handle(core, conn, conn.recv(), lora_calls):
                    return
            # Step N's outputs are sent while the device runs step N+1.
            done = core.step()
            if done is not None:
                _send_outputs(conn, *done)
            lora_calls.answer_done()
            stats_logger.maybe_log(core.get_stats)
            pulse.tick = time.monotonic()
    except (EOFError, BrokenPipeError):   # the API process is gone
        return
    finally:
        core.shutdown()   # tensor-parallel workers (none at size 1)


class _SharedConn:
    """The core's end of the pipe, shared by the step loop and the heartbeat thread: one send at a time."""

    def __init__(self, conn: Connection):
        self.conn, self.lock = conn, threading.Lock()

    def send(self, msg: tuple):
        with self.lock:
            self.conn.send(msg)

    def poll(self, timeout: float | None = 0.0) -> bool:
        return self.conn.poll(timeout)

    def recv(self):
        return self.conn.recv()


class _Pulse:
    """The heartbeat thread: every HEARTBEAT_INTERVAL, ("heartbeat", seconds since the loop set `tick`)."""

    def __init__(self, conn: _SharedConn):
        self.conn, self.tick = conn, time.monotonic()
        threading.Thread(target=self._beat, name="pagedllm-core-heartbeat", daemon=True).start()

    def _beat(self):
        while True:
            time.sleep(HEARTBEAT_INTERVAL)
            try:
                self.conn.send(("heartbeat", time.monotonic() - self.tick))
            except OSError:   # the API process is gone; the loop ends on its own
                return


def freeze_gc():
    """Start-up's objects (model, graphs, buffers; tokenizer and app in the API process) live as long as the
    process: moved out of the collector's view, so that a full collection while serving does not walk them
    (vLLM does the same)."""
    gc.collect()
    gc.freeze()


def _startup_info(config: EngineConfig, runner, seconds: float) -> dict:
    """What the API process logs once the core is ready (the serve log's start-up line)."""
    return {"model": config.model, "device": str(runner.device), "dtype": str(runner.dtype).removeprefix("torch."),
            "load_seconds": runner.load_seconds, "num_blocks": runner.num_blocks, "block_size": runner.block_size,
            "capture_seconds": None if runner.graphs is None else runner.graphs.capture_seconds,
            "startup_seconds": seconds}


def _log_ready(info: dict):
    graphs = ("no CUDA graphs" if info["capture_seconds"] is None
              else f"CUDA graphs captured in {info['capture_seconds']:.1f} s")
    logger.info("engine core ready in %.1f s: %s on %s (%s), weights loaded in %.1f s, %d KV blocks of %d tokens, "
                "%s", info["startup_seconds"], info["model"], info["device"], info["dtype"], info["load_seconds"],
                info["num_blocks"], info["block_size"], graphs)


def _send_outputs(conn: "_SharedConn", outputs: list, stats: StepStats):
    if outputs or stats.first_scheduled_ids:
        # Rows of field values pickle ~6x faster than dataclass objects (0.07 vs 0.4 ms for 256).
        conn.send(("outputs", [tuple(o.__dict__.values()) for o in outputs], stats))


def _handle(core, conn: _SharedConn, msg: tuple, lora_calls: "_LoRACalls") -> bool:
    kind = msg[0]
    if kind == "add":
        for request in msg[1]:
            core.add_request(request)
    elif kind == "finish":
        core.finish_requests(msg[1], msg[2])
    elif kind == "release":   # held requests (beam search) that get no more children
        core.release_kv_holds(msg[1])
    elif kind == "stats":
        conn.send(("stats", core.get_stats()))
    elif kind == "lora":   # ("lora", call id, add_lora | remove_lora | list_loras, *args)
        lora_calls.start(msg[1], msg[2], msg[3:])
    elif kind == "shutdown":
        return False
    else:
        raise ValueError(f"unknown engine core message {kind!r}")
    return True


class _LoRACalls:
    """add_lora / remove_lora / list_loras, answered ("lora_reply", call id, result or exception). add_lora reads
    a new adapter on a loader thread (EngineCore.add_lora_async): its caller waits for the read, steps of other
    requests do not; it is answered after the step that puts the adapter on the host, so any later call or
    request finds it there. The others are answered at once."""

    def __init__(self, core, conn: _SharedConn):
        self.core, self.conn = core, conn
        self.pending: list[tuple[int, object]] = []   # (call id, Future) of add_lora calls whose read runs

    def start(self, call_id: int, name: str, args: tuple):
        try:
            if name == "add_lora":
                self.pending.append((call_id, self.core.add_lora_async(*args)))
                return self.answer_done()
            if name not in ("remove_lora", "list_loras"):
                raise ValueError(f"unknown LoRA call {name!r}")
            result = getattr(self.core, name)(*args)
        except Exception as e:  # noqa: BLE001 - a bad adapter, LoRA off: the caller's error, not the core's
            result = e
        self._reply(call_id, result)

    def answer_done(self):
        if not self.pending:
            return
        still = []
        for call_id, future in self.pending:
            if not future.done():
                still.append((call_id, future))
            else:
                self._reply(call_id, future.exception() or future.result())
        self.pending = still

    def _reply(self, call_id: int, result):
        self.conn.send(("lora_reply", call_id, result))


class CoreClient:
    """Starts the core process; wait_ready() returns once its KV cache is allocated (or raises its error)."""

    def __init__(self, config: EngineConfig):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=run_engine_core, name="pagedllm-engine-core", daemon=True,
                                   args=(config, child_conn, logging.getLogger("pagedllm").getEffectiveLevel()))
        self.process.start()
        child_conn.close()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_loop, name="pagedllm-core-writer", daemon=True)
        self._writer.start()

    def wait_ready(self) -> int:
        """The number of KV cache blocks, once the core has them."""
        while not self.conn.poll(0.5):
            if not self.process.is_alive():
                raise RuntimeError(f"the engine core process died while starting (exit code "
                                   f"{self.process.exitcode}); see its log above")
        msg = self.conn.recv()
        if msg[0] == "failed":
            self.process.join()
            raise ValueError(msg[1])
        _log_ready(msg[2])
        return msg[1]

    def send(self, msg: tuple):
        self._outbox.put(msg)

    def _write_loop(self):
        while (msg := self._outbox.get()) is not None:
            try:
                self.conn.send(msg)
            except (BrokenPipeError, OSError) as e:   # the core is gone; anything else would lose messages
                self.process.join(timeout=1)            # (AsyncLLM reports its death)
                if self.process.is_alive():
                    logger.error("cannot send to the engine core: %s", e)
                return

    def shutdown(self):
        self.send(("shutdown",))
        self._outbox.put(None)
        self._writer.join(timeout=5)
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
        self.conn.close()
