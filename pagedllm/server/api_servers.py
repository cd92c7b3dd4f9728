"""`pagedllm serve --api-server-count N`: N API processes on one port, in front of one engine core (vLLM's flag).

One API process does all of a request's HTTP work (parsing, tokenizing, detokenizing, JSON and SSE) on one core
of the CPU; under heavy streaming it is busy for the whole run (benchmarks/RESULTS.md, 2026-12-03) while the
engine core waits on it. With several, each accepts connections from the one listening socket (the kernel hands
each new connection to one of them) and sends its requests to the shared core over its own pipe
(core_process.py routes each request's outputs back to the process that sent it).

    this process (supervisor): binds the port, starts the core and the API processes, waits
      ├── engine core process ◄── one pipe per API process ──►  API process 0 .. N-1 (uvicorn on the shared socket)

What is shared: the engine (its KV cache, prefix cache and adapters), /metrics (latency histograms summed over
the processes through prometheus_client's multiprocess files; engine gauges read from the core) and the bound of
--max-waiting-queue-length (one count in shared memory). What is not: adapter names loaded at run time
(/v1/load_lora_adapter would name an adapter in one process only), so runtime LoRA updating is refused with
N > 1; --lora-modules are loaded by every process under the same ids.

Faults: a stop signal reaches every API process (each finishes its requests in flight as a single server does);
the core returns once all have left. An API process that dies, or a core that dies (each API process then exits
with code 1), stops the rest: the supervisor exits with code 1, as a single server whose core died.
"""
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import replace

from pagedllm.config import EngineConfig, ServerConfig
from pagedllm.engine.core_process import CoreClient, start_core
from pagedllm.server.launch import ServeChecks, listen
from pagedllm.server.metrics import METRICS_DIR_ENV

logger = logging.getLogger("pagedllm")
STOP_SECONDS = 30   # for the API processes to stop after a signal (their grace and uvicorn's), then killed


def serve_with_api_servers(engine_config: EngineConfig, server_config: ServerConfig, checks: ServeChecks):
    n = server_config.api_server_count
    metrics_dir, own_dir = _metrics_dir()
    sock = listen(server_config.host, server_config.port)
    server_config = replace(server_config, port=sock.getsockname()[1])   # port 0: the one the system chose
    ctx = multiprocessing.get_context("spawn")
    shared_waiting = ctx.Value("q", 0) if server_config.max_waiting_queue_length is not None else None
    core, conns = start_core(engine_config, n)   # it sends each API process the config it runs
    workers = []
    try:
        for i, conn in enumerate(conns):
            worker = ctx.Process(target=_api_server_main, name=f"pagedllm-api-server-{i}",
                                 args=(engine_config, server_config, checks, conn, sock, i, shared_waiting,
                                       logging.getLogger("pagedllm").getEffectiveLevel()))
            worker.start()
            conn.close()   # the worker holds it: its exit is the core's EOF on that pipe
            workers.append(worker)
        sock.close()
        code = _supervise(core, workers)
    finally:
        _stop(workers, core)
        if own_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    if code:
        sys.exit(code)


def _metrics_dir() -> tuple[str, bool]:
    """prometheus_client's directory for the API processes' metric files, set in the environment they inherit:
    the user's (PROMETHEUS_MULTIPROC_DIR, theirs to empty between runs, as prometheus_client says), or a new one
    deleted at the end. Returns (the directory, whether it is ours)."""
    given = os.environ.get(METRICS_DIR_ENV)
    if given:
        if not os.path.isdir(given):
            raise ValueError(f"{METRICS_DIR_ENV}={given!r} is not a directory")
        return given, False
    os.environ[METRICS_DIR_ENV] = tempfile.mkdtemp(prefix="pagedllm-metrics-")
    return os.environ[METRICS_DIR_ENV], True


def _api_server_main(config: EngineConfig, server_config: ServerConfig, checks: ServeChecks, conn,
                     sock: socket.socket, index: int, shared_waiting, log_level: int):
    """An API process's main (spawned)."""
    logging.basicConfig(level=log_level, format=f"%(levelname)s %(name)s (API {index}): %(message)s")
    from pagedllm.server.api_server import run_api_server
    try:
        run_api_server(config, server_config, checks, CoreClient.connect(conn, log_ready=index == 0), sock, index,
                       shared_waiting)
    except (ValueError, FileNotFoundError, RuntimeError) as e:   # the core failed to start: said once
        if index == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _supervise(core: multiprocessing.Process, workers: list) -> int:
    """Waits until every API process has exited; a stop signal is passed on to them. Returns the exit code: 0
    after a stop signal (or every process ending cleanly), else the first failed process's code."""
    stopping, code = False, 0

    def on_signal(*_):
        nonlocal stopping
        stopping = True
        _terminate(workers)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    running = list(workers)
    while running:
        sentinels = [w.sentinel for w in running] + ([core.sentinel] if core.is_alive() else [])
        multiprocessing.connection.wait(sentinels, timeout=1.0)
        for worker in [w for w in running if not w.is_alive()]:
            running.remove(worker)
            if worker.exitcode != 0 and code == 0:
                code = worker.exitcode if worker.exitcode > 0 else 1   # killed by a signal: 1
                if not stopping:
                    logger.error("%s exited with code %s: stopping the server", worker.name, worker.exitcode)
                    stopping = True
                    _terminate(running)
    return code


def _terminate(workers: list):
    for worker in workers:
        if worker.is_alive():
            worker.terminate()   # SIGTERM: uvicorn's graceful stop


def _stop(workers: list, core: multiprocessing.Process):
    _terminate(workers)
    for worker in workers:
        worker.join(timeout=STOP_SECONDS)
        if worker.is_alive():
            worker.kill()
    core.join(timeout=10)   # it returns once every API process has left
    if core.is_alive():
        core.kill()
