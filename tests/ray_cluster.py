"""A local Ray cluster for tests, started as Ray's docs say: `ray start --head`, then `ray start --address=...`
for each further node (all on this machine, each with its own ports and resources). RAY_ADDRESS names the head
while it runs, so the engine's ray.init(address="auto") finds it.

Each node runs `ray start --block` in its own session, stopped by its pid (SIGTERM: it stops its node's Ray
processes; then its process group), rather than `ray stop`, which stops every Ray process of this user."""
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START_TIMEOUT = 90.0
PORTS = ["node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
         "runtime-env-agent-port", "metrics-export-port"]


@contextlib.contextmanager
def ray_cluster(nodes: list[tuple[list[str], dict]]):
    """nodes: (resource args such as --num-cpus=1, extra environment) a node, the head first."""
    import ray
    tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))   # short: Ray's socket paths live under it
    port, procs, old = _free_port(), [], os.environ.get("RAY_ADDRESS")
    try:
        for i, (args, env) in enumerate(nodes):
            where = ["--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={tmp}"] if i == 0 else [
                f"--address=127.0.0.1:{port}"]
            procs.append(_start_node(where + args, env, tmp / f"node{i}.log"))
        os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"
        yield
    finally:
        ray.shutdown()
        for proc in reversed(procs):
            _stop(proc)
        if old is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = old
        shutil.rmtree(tmp, ignore_errors=True)


def _start_node(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """`ray start ... --block`, running when it returns."""
    cmd = [str(Path(sys.executable).with_name("ray")), "start", *args, "--object-store-memory=100000000",
           "--disable-usage-stats", "--block", *(f"--{p}={_free_port()}" for p in PORTS)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **env}   # actors import this checkout
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT
    while "block forever" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            raise RuntimeError(f"`ray start` did not start: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)   # its own session (start_new_session): only what it started
    except ProcessLookupError:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
