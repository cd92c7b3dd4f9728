"""Helpers of the server tests: starting `pagedllm serve`, reading /metrics."""
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

API_KEY = "test-key"
SMALL_API_KEY = "small-key"
EDGE_API_KEY = "edge-key"
EDGE_ORIGIN = "https://app.example"   # the edge server's CORS origin, root path, body limit, model length
EDGE_ROOT_PATH = "/llm"
EDGE_MAX_BODY = 1 << 20
EDGE_MAX_MODEL_LEN = 64
MODEL_NAME = "tiny"
# Renders tool calls, tool answers and a template variable (`note`, from chat_template_kwargs) as tool-use
# templates do, so tests can see them reach the template; plain conversations render as "role: content".
CHAT_TEMPLATE = ("{% if note is defined %}[{{ note }}]\n{% endif %}"
                 "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                 "{% if m.tool_calls is defined %}{% for c in m.tool_calls %} <call {{ c.id }}>{{ c.function.name }}"
                 "{{ c.function.arguments | tojson }}</call>{% endfor %}{% endif %}"
                 "{% if m.tool_call_id is defined %} <for {{ m.tool_call_id }}>{% endif %}{{ '\\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
NUM_BLOCKS = 2048
MAX_MODEL_LEN = 512


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log_path: str
    api_key: str | None
    ca_file: str | None = None   # an HTTPS server's self-signed certificate

    @property
    def verify(self) -> ssl.SSLContext | bool:
        """httpx's verify= for this server."""
        return ssl.create_default_context(cafile=self.ca_file) if self.ca_file else True

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tls_cert(directory: str) -> tuple[str, str] | None:
    """A self-signed certificate for 127.0.0.1 (key, cert), made with the openssl CLI; None without it."""
    if shutil.which("openssl") is None:
        return None
    key, cert = os.path.join(directory, "key.pem"), os.path.join(directory, "cert.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return key, cert


def start_server(model_dir: str, log_path: str, api_key: str | None, *flags: str,
                 main: tuple[str, ...] = ("-m", "pagedllm.cli"), env: dict[str, str] | None = None) -> Server:
    """main: what python runs (the CLI, or a script that wraps it: tests/server/inject_fault.py); env: variables
    the server gets beside this process's."""
    port = _free_port()
    cmd = [sys.executable, *main, "serve", model_dir, "--port", str(port),
           "--served-model-name", MODEL_NAME, "--num-gpu-blocks-override", str(NUM_BLOCKS),
           "--max-model-len", str(MAX_MODEL_LEN), "--log-stats-interval", "0", "--log-level", "warning",
           "--device", "cpu", *flags]   # float32 on CPU: the exact reference also on a GPU machine
    # One torch thread: the server's two processes and the test process share two cores.
    # VLLM_API_KEY emptied: the server would take it as its key (a vLLM set-up's variable in the tests' shell)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PAGEDLLM_API_KEY": "" if "--api-key" in flags else (api_key or ""),
           "VLLM_API_KEY": "", **(env or {})}
    log = open(log_path, "w")
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                               cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    if "--ssl-certfile" in flags:
        cert = flags[flags.index("--ssl-certfile") + 1]
        return Server(f"https://127.0.0.1:{port}", process, log_path, api_key, ca_file=cert)
    return Server(f"http://127.0.0.1:{port}", process, log_path, api_key)


@contextmanager
def serving(started: dict[str, Server]):
    """Servers started at once (start-up is most of their cost): healthy on entry, stopped on exit unless a
    test ended them itself."""
    try:
        for server in started.values():
            wait_healthy(server)
        yield started
    finally:
        for server in started.values():
            if server.process.poll() is None:
                stop_server(server)


def spawned_children(pid: int) -> list[int]:
    """The processes a server process spawned (its engine core; with --api-server-count, also its API
    processes; multiprocessing's resource tracker is not one), in start order. From /proc: no psutil needed."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])   # field 4 of stat: the parent pid
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if parent == pid and b"spawn_main" in cmdline:
            found.append(int(stat.parent.name))
    return sorted(found)


def stream_text(stream) -> tuple[dict[int, str], dict[int, str], object]:
    """A streamed completion or chat (the openai client's chunks) joined: texts and finish reasons by choice
    index, and the usage chunk's usage (None without one)."""
    texts, reasons, usage = {}, {}, None
    for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.text if hasattr(c, "text") else c.delta.content or "")
            reasons[c.index] = c.finish_reason or reasons.get(c.index)
    return texts, reasons, usage


def wait_healthy(server: Server, timeout: float = 180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited ({server.process.returncode}):\n{open(server.log_path).read()}")
        try:
            if httpx.get(server.url + "/health", timeout=1.0, verify=server.verify).status_code == 200:
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


def is_openai_error(r) -> bool:
    """{"error": {"message": str, "type": str, "param": str | None, "code": str | None}} and nothing else."""
    try:
        body = r.json()
    except ValueError:
        return False
    error = body.get("error") if isinstance(body, dict) and set(body) == {"error"} else None
    return (isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}
            and isinstance(error["message"], str) and bool(error["message"]) and isinstance(error["type"], str)
            and all(error[k] is None or isinstance(error[k], str) for k in ("param", "code")))


def is_anthropic_error(r) -> bool:
    """Anthropic's routes: {"type": "error", "error": {"type": str, "message": str}} and nothing else."""
    try:
        body = r.json()
    except ValueError:
        return False
    error = body.get("error") if isinstance(body, dict) and set(body) == {"type", "error"} else None
    return (isinstance(error, dict) and body["type"] == "error" and set(error) == {"type", "message"}
            and isinstance(error["type"], str) and isinstance(error["message"], str) and bool(error["message"]))


@dataclass
class Tally:
    """What a fuzzer sent and got: requests, by status, 5xx, wrongly shaped errors (with examples)."""
    name: str
    by_status: dict = field(default_factory=dict)
    bad: list = field(default_factory=list)

    def record(self, status: int, shaped: bool, what: str):
        self.by_status[status] = self.by_status.get(status, 0) + 1
        if status >= 500 or (status >= 400 and not shaped):
            self.bad.append(f"{status} {'shaped' if shaped else 'NOT SHAPED'}: {what[:300]}")

    def summary(self) -> dict:
        return {"fuzzer": self.name, "requests": sum(self.by_status.values()),
                "by_status": dict(sorted(self.by_status.items())),
                "5xx": sum(n for s, n in self.by_status.items() if s >= 500),
                "wrongly_shaped": sum("NOT SHAPED" in b for b in self.bad), "examples": self.bad[:10]}
