"""The engine core in a process of its own, and the API process's handle on it.

Why a process: the step loop is Python (scheduling, input building, kernel launches), and so is the
server's HTTP work (parsing, tokenizing, detokenizing, JSON and SSE). In one process they would share the
GIL, and every chunk sent to a client would be time taken from the next step. Here the core process only
schedules, runs the model and sends token ids; the API process does everything else.

    API process                                   core process (spawned: safe with CUDA and OpenMP)
      CoreClient.send(msg)  ── writer thread ──►  pipe ──►  drained between steps
      reader callback (event loop)  ◄──────────── pipe ◄──  ("outputs", [EngineCoreOutput], StepStats)

Messages are tuples: ("add", [EngineCoreRequest]), ("finish", [child ids], RequestStatus), ("release", [ids]),
("stats",), ("lora", call id, name, *args), ("shutdown",) in; ("ready", num_blocks, startup info, the config it
runs) or ("failed", message) once, then ("outputs", [EngineCoreOutput field values], StepStats) and ("stats",
SchedulerStats) out, in order, and ("lora_reply", call id, result) when a LoRA call is done (an adapter's read
holds no other message).
The writer thread keeps the event loop from blocking on a full pipe (a burst of long prompts) while the core is
itself blocked sending outputs: that would deadlock.

Faults: once ready, a thread of the core process sends ("heartbeat", seconds since the step loop last came
round) every HEARTBEAT_INTERVAL, whatever the loop is doing. A stopped or frozen process sends none; a long
step (a large prefill, a kernel compiling) sends beats whose stall grows; the API process judges both
(AsyncLLM.unhealthy_reason: heartbeat_timeout for silence, step_timeout for a stall). The core ignores SIGINT and
SIGTERM: a Ctrl-C reaches the whole terminal process group, `timeout` and systemd's stop signal the whole group
too, and the core must outlive the API processes' grace for the requests in flight; they stop it through the pipe.
The core's life is tied to the pipe: it returns when the API process is gone.

Several API processes (`pagedllm serve --api-server-count N`): the core has one pipe to each (`start_core`), and
each one's CoreClient is `CoreClient.connect(conn)`. The core remembers which pipe added each request and sends a
request's outputs (and its first-scheduled times) down that pipe alone; a stats or LoRA call is answered on the
pipe it came by; heartbeats go to all. An API process that leaves ("shutdown", or its pipe's EOF) takes its
requests with it (aborted); the core returns when the last one has left.
"""
import concurrent.futures
import gc
import logging
import multiprocessing
import multiprocessing.connection
import queue
import signal
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler

from pagedllm.config import EngineConfig
from pagedllm.metrics import StatsLogger, StepStats
from pagedllm.request import RequestStatus

logger = logging.getLogger("pagedllm")
HEARTBEAT_INTERVAL = 1.0   # seconds between heartbeats of the core process


def run_engine_core(config: EngineConfig, conns: list[Connection], log_level: int):
    """The core process's main: build the engine core, then step while there is work (and an API process)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s (engine core): %(message)s")
    clients = _Clients(conns)
    start = time.perf_counter()
    try:
        from pagedllm.engine.core import EngineCore
        config, model = serving_config(config)
        core = EngineCore(config, model.hf_config, model.device, model.dtype, model.max_model_len)
    except Exception as e:   # reported to the API processes, which exit with the message
        clients.send_all(("failed", f"{type(e).__name__}: {e}"))
        return
    freeze_gc()
    clients.send_all(("ready", core.runner.num_blocks, _startup_info(config, core.runner, time.perf_counter() - start),
                      config))
    if not config.skip_tokenizer_init:
        core.structured.pool.warm_up()   # a server's first constrained request then pays only its compile
    stats_logger = StatsLogger(config.log_stats_interval)
    pulse = _Pulse(clients)
    lora_calls = _LoRACalls(core, clients)
    try:
        while clients.live:
            # Idle: wait for a message (a heartbeat's time at most). Busy: take what has arrived, then step.
            for conn, msg in clients.receive(0 if core.has_work() else HEARTBEAT_INTERVAL, core):
                _handle(core, conn, msg, lora_calls, clients)
            if not clients.live:
                return
            # Step N's outputs are sent while the device runs step N+1.
            done = core.step()
            if done is not None:
                clients.send_outputs(*done)
            lora_calls.answer_done()
            stats_logger.maybe_log(core.get_stats)
            pulse.tick = time.monotonic()
    finally:
        core.shutdown()   # tensor-parallel workers (none at tensor_parallel_size 1)


class _SharedConn:
    """The core's end of one API process's pipe, shared by the step loop and the heartbeat thread: one send at a
    time."""

    def __init__(self, conn: Connection):
        self.conn, self.lock = conn, threading.Lock()

    def send(self, msg: tuple):
        with self.lock:
            self.conn.send(msg)

    def poll(self, timeout: float | None = 0.0) -> bool:
        return self.conn.poll(timeout)

    def recv(self):
        return self.conn.recv()


class _Clients:
    """The API processes' pipes. With one (the usual server, AsyncLLM in a script) nothing is routed: every
    output goes down the one pipe. With several, `owner` maps each live request (child id) to its pipe."""

    def __init__(self, conns: list[Connection]):
        self.live = [_SharedConn(c) for c in conns]
        self.routed = len(conns) > 1
        self.owner: dict[str, _SharedConn] = {}

    def send_all(self, msg: tuple):
        for conn in list(self.live):
            self.send(conn, msg)

    def send(self, conn: _SharedConn, msg: tuple):
        try:
            conn.send(msg)
        except OSError:   # BrokenPipeError: that API process is gone; its EOF is read at the next receive
            pass

    def receive(self, timeout: float, core) -> list[tuple[_SharedConn, tuple]]:
        """The messages that have arrived (waiting up to `timeout` for the first), with the pipe of each."""
        ready_raw = set(multiprocessing.connection.wait([c.conn for c in self.live], timeout))
        ready = [c for c in self.live if c.conn in ready_raw]
        msgs = []
        for conn in ready:
            try:
                while conn.poll():
                    msgs.append((conn, conn.recv()))
            except (EOFError, OSError):   # that API process is gone: what it sent last is moot
                self.leave(conn, core)
                msgs = [m for m in msgs if m[0] is not conn]
        return msgs

    def leave(self, conn: _SharedConn, core):
        """An API process is gone or shutting down: its requests (none after a clean stop) are aborted."""
        if conn not in self.live:
            return
        self.live.remove(conn)
        orphans = [rid for rid, c in self.owner.items() if c is conn]
        for rid in orphans:
            del self.owner[rid]
        if orphans and self.live:
            core.finish_requests(orphans, RequestStatus.FINISHED_ABORTED)

    def add(self, conn: _SharedConn, requests: list):
        if self.routed:
            self.owner.update((r.request_id, conn) for r in requests)

    def forget(self, request_ids: list[str]):
        if self.routed:
            for rid in request_ids:
                self.owner.pop(rid, None)

    def send_outputs(self, outputs: list, stats: StepStats):
        if not self.routed:
            if outputs or stats.first_scheduled_ids:
                self.send(self.live[0], _outputs_msg(outputs, stats))
            return
        # First schedulings before outputs: a request can finish in its first step (max_tokens 1), and its
        # owner is forgotten with its last output
        firsts: dict[_SharedConn, StepStats] = {}
        for rid, seconds in zip(stats.first_scheduled_ids, stats.queue_times):
            conn = self.owner.get(rid)
            if conn is not None:
                s = firsts.setdefault(conn, StepStats())
                s.first_scheduled_ids.append(rid)
                s.queue_times.append(seconds)
        rows: dict[_SharedConn, list] = {}
        for o in outputs:
            conn = self.owner.get(o.req_id) if o.finish_reason is None else self.owner.pop(o.req_id, None)
            if conn is not None:   # None: its API process left, or aborted it
                rows.setdefault(conn, []).append(o)
        for conn in rows.keys() | firsts.keys():
            self.send(conn, _outputs_msg(rows.get(conn, []), firsts.get(conn) or StepStats()))


def _outputs_msg(outputs: list, stats: StepStats) -> tuple:
    # Rows of field values pickle ~6x faster than dataclass objects (0.07 vs 0.4 ms for 256).
    return ("outputs", [tuple(o.__dict__.values()) for o in outputs], stats)


class _Pulse:
    """The heartbeat thread: every HEARTBEAT_INTERVAL, ("heartbeat", seconds since the loop set `tick`) to every
    API process."""

    def __init__(self, clients: _Clients):
        self.clients, self.tick = clients, time.monotonic()
        threading.Thread(target=self._beat, name="pagedllm-core-heartbeat", daemon=True).start()

    def _beat(self):
        while True:
            time.sleep(HEARTBEAT_INTERVAL)
            self.clients.send_all(("heartbeat", time.monotonic() - self.tick))


def serving_config(config: EngineConfig) -> tuple[EngineConfig, object]:
    """The config an online engine core runs (batch defaults for its GPU, for serving) and its resolved model:
    derived in the core process, which sends it to the API processes with its "ready" (they need no GPU)."""
    from pagedllm.engine.engine import is_large_gpu, resolve_model
    model = resolve_model(config)
    return config.with_batch_defaults(is_large_gpu(model.device), serving=True), model


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


def _handle(core, conn: _SharedConn, msg: tuple, lora_calls: "_LoRACalls", clients: _Clients):
    kind = msg[0]
    if kind == "add":
        clients.add(conn, msg[1])
        for request in msg[1]:
            core.add_request(request)
    elif kind == "finish":
        clients.forget(msg[1])
        core.finish_requests(msg[1], msg[2])
    elif kind == "release":   # held requests (beam search) that get no more children
        core.release_kv_holds(msg[1])
    elif kind == "stats":
        clients.send(conn, ("stats", core.get_stats()))
    elif kind == "lora":   # ("lora", call id, add_lora | remove_lora | list_loras | pin_lora, *args), and
        # reset_prefix_cache, pause, resume, is_paused, profile: the calls answered by call id
        lora_calls.start(conn, msg[1], msg[2], msg[3:])
    elif kind == "shutdown":
        clients.leave(conn, core)
    else:
        raise ValueError(f"unknown engine core message {kind!r}")


# the engine core's methods a call may name, besides add_lora
_CALLS = ("remove_lora", "list_loras", "pin_lora", "reset_prefix_cache", "pause", "resume", "is_paused", "profile")


class _LoRACalls:
    """add_lora / remove_lora / list_loras / pin_lora, answered ("lora_reply", call id, result or exception).
    add_lora reads a new adapter on a loader thread (EngineCore.add_lora_async): its caller waits for the read,
    steps of other requests do not; it is answered after the step that puts the adapter on the host, so any later
    call or request finds it there. A pause (engine/pause.py) is answered after the step that leaves the engine
    idle, its aborts' outputs sent before the answer. The others are answered at once."""

    def __init__(self, core, clients: _Clients):
        self.core, self.clients = core, clients
        # (pipe, call id, Future) of the add_lora calls whose read runs
        self.pending: list[tuple[_SharedConn, int, object]] = []

    def start(self, conn: _SharedConn, call_id: int, name: str, args: tuple):
        try:
            if name == "add_lora":
                self.pending.append((conn, call_id, self.core.add_lora_async(*args)))
                return self.answer_done()
            if name not in _CALLS:
                raise ValueError(f"unknown engine core call {name!r}")
            result = getattr(self.core, name)(*args)
            if isinstance(result, concurrent.futures.Future):   # a pause waiting for the running requests
                self.pending.append((conn, call_id, result))
                return None
        except Exception as e:  # noqa: BLE001 - a bad adapter, LoRA off: the caller's error, not the core's
            result = e
        self._reply(conn, call_id, result)

    def answer_done(self):
        if not self.pending:
            return
        still = []
        for conn, call_id, future in self.pending:
            if not future.done():
                still.append((conn, call_id, future))
            else:
                self._reply(conn, call_id, future.exception() or future.result())
        self.pending = still

    def _reply(self, conn: _SharedConn, call_id: int, result):
        self.clients.send(conn, ("lora_reply", call_id, result))


def start_core(config: EngineConfig, num_clients: int) -> tuple[multiprocessing.Process, list[Connection]]:
    """Spawns the core process with a pipe for each of `num_clients` API processes: (the process, the API ends)."""
    ctx = multiprocessing.get_context("spawn")
    pipes = [ctx.Pipe() for _ in range(num_clients)]
    core_ends = [core_end for _, core_end in pipes]
    process = ctx.Process(target=run_engine_core, name="pagedllm-engine-core", daemon=True,
                          args=(config, core_ends, logging.getLogger("pagedllm").getEffectiveLevel()))
    process.start()
    for core_end in core_ends:   # the core holds them now: its exit is each API end's EOF
        core_end.close()
    return process, [api_end for api_end, _ in pipes]


class _OtherProcess:
    """The core process as an API process that did not start it sees it: alive until its pipe's EOF (AsyncLLM
    reads that EOF as its exit); its exit code is its parent's to read."""
    exitcode = None

    def is_alive(self) -> bool:
        return True

    def join(self, timeout: float | None = None):
        pass

    def kill(self):
        pass


class CoreClient:
    """The API process's end of the core's pipe: starts the core process (or, connect(), joins one that another
    process started); wait_ready() returns once its KV cache is allocated (or raises its error)."""

    def __init__(self, config: EngineConfig | None, conn: Connection | None = None, log_ready: bool = True):
        if conn is None:
            self.process, (conn,) = start_core(config, 1)
        else:
            self.process = _OtherProcess()
        self.conn, self.log_ready = conn, log_ready
        self.closing = False
        self.ready = False                  # its "ready" read: before it, a shutdown has nothing to wait for
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_loop, name="pagedllm-core-writer", daemon=True)
        self._writer.start()

    @classmethod
    def connect(cls, conn: Connection, log_ready: bool) -> "CoreClient":
        """A client of a core that start_core started in another process (one of several API processes)."""
        return cls(None, conn, log_ready)

    def wait_ready(self) -> tuple[int, EngineConfig]:
        """(The number of KV cache blocks, the config the core runs), once the core has its KV cache."""
        try:
            while not self.conn.poll(0.5):
                if not self.process.is_alive():
                    raise EOFError
            msg = self.conn.recv()
        except EOFError:
            self.process.join(timeout=1)
            raise RuntimeError(f"the engine core process died while starting (exit code "
                               f"{self.process.exitcode}); see its log above") from None
        if msg[0] == "failed":
            self.process.join()
            raise ValueError(msg[1])
        if self.log_ready:
            _log_ready(msg[2])
        self.ready = True
        return msg[1], msg[3]

    def send(self, msg: tuple):
        """Pickled here, in the caller's thread: a message that cannot be (a request nested past the recursion
        limit) raises to its sender, where in the writer thread it ended the thread and every later message."""
        self._outbox.put(ForkingPickler.dumps(msg))

    def _write_loop(self):
        while (data := self._outbox.get()) is not None:
            try:
                self.conn.send_bytes(data)    # what Connection.send writes: the core's recv() reads it
            except (BrokenPipeError, OSError) as e:   # the core is gone; anything else would lose messages
                self.process.join(timeout=1)            # (AsyncLLM reports its death)
                if self.process.is_alive() and not self.closing:
                    logger.error("cannot send to the engine core: %s", e)
                return

    def shutdown(self, timeout: float | None = None):
        """timeout: seconds to wait for the core's exit before it is killed (None: 5)."""
        timeout = 5.0 if timeout is None else timeout
        self.closing = True
        if not self.ready:   # still loading (a start-up that failed or was interrupted): it reads no pipe yet
            self.process.kill()
        self.send(("shutdown",))
        self._outbox.put(None)
        self._writer.join(timeout=timeout)
        self.process.join(timeout=timeout)
        if self.process.is_alive():
            self.process.kill()
        self.conn.close()
