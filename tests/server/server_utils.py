"""Helpers of the server tests: starting `pagedllm serve`, reading /metrics."""
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx

API_KEY = "test-key"
SMALL_API_KEY = "small-key"
MODEL_NAME = "tiny"
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
NUM_BLOCKS = 2048
MAX_MODEL_LEN = 512


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log_path: str
    api_key: str | None

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: str, log_path: str, api_key: str | None, *flags: str,
                 main: tuple[str, ...] = ("-m", "pagedllm.cli")) -> Server:
    """main: what python runs (the CLI, or a script that wraps it: tests/server/inject_fault.py)."""
    port = _free_port()
    cmd = [sys.executable, *main, "serve", model_dir, "--port", str(port),
           "--served-model-name", MODEL_NAME, "--num-gpu-blocks-override", str(NUM_BLOCKS),
           "--max-model-len", str(MAX_MODEL_LEN), "--log-stats-interval", "0", "--log-level", "warning",
           "--device", "cpu", *flags]   # float32 on CPU: the exact reference also on a GPU machine
    # One torch thread: the server's two processes and the test process share two cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PAGEDLLM_API_KEY": "" if "--api-key" in flags else (api_key or "")}
    log = open(log_path, "w")
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                               cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    return Server(f"http://127.0.0.1:{port}", process, log_path, api_key)


def wait_healthy(server: Server, timeout: float = 180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited ({server.process.returncode}):\n{open(server.log_path).read()}")
        try:
            if httpx.get(server.url + "/health", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server not healthy after {timeout} s:\n{open(server.log_path).read()}")


def stop_server(server: Server):
    server.process.terminate()
    try:
        server.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.process.kill()


def engine_metrics(server: Server) -> dict[str, float]:
    """The unlabelled-by-reason pagedllm: samples of /metrics, by name."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        if line.startswith("pagedllm:") and "_bucket" not in line:
            name, value = line.rsplit(" ", 1)
            values[name.split("{")[0] if "finished_reason" not in name else name] = float(value)
    return values


def finished(metrics: dict[str, float], reason: str) -> float:
    """pagedllm:request_success_total for one finish reason (0 before the first)."""
    return sum(v for k, v in metrics.items() if k.startswith("pagedllm:request_success_total")
               and f'finished_reason="{reason}"' in k)


def wait_all_blocks_free(server: Server, timeout: float = 15.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = engine_metrics(server)
        idle = (m["pagedllm:num_requests_running"] == 0 and m["pagedllm:num_requests_waiting"] == 0
                and m["pagedllm:kv_cache_usage_perc"] == 0.0)
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.05)
