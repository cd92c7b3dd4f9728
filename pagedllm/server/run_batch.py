"""`pagedllm run-batch -i INPUT.jsonl -o OUTPUT.jsonl MODEL`: a file of requests in OpenAI's Batch format, answered
offline (vLLM's `vllm run-batch`).

Each input line is {"custom_id", "method": "POST", "url", "body"}, url one of ROUTES. The requests go, all at once
(up to MAX_IN_FLIGHT), to the same app `pagedllm serve` runs, in this process, so that a body means exactly what
it means to the server and the engine batches them. Each line gets one output line, in the input's order:

    {"id": "batch_req_...", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}

body is the answer, or the error body ({"error": {...}}) for a status other than 200; error is then that same
error body (vLLM's run-batch puts its ErrorResponse there, OpenAI's Batch API in the body: both readers find it).
A line that is not a request (bad JSON, no custom_id, another method or url, a streamed body) gets a 400 line
naming what is wrong; nothing is
dropped. Engine and server flags are serve's. The input and output may be http(s) URLs (batch_files.py).
With --enable-metrics (vLLM's), serve's /metrics is served on --host:--port while the batch runs (_MetricsListener).
"""
import asyncio
import json
import logging
import socket
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from pagedllm.config import EngineConfig, ServerConfig

logger = logging.getLogger("pagedllm")

ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
LINE_FIELDS = {"custom_id", "method", "url", "body"}
MAX_IN_FLIGHT = 4096   # requests handed to the app at once; the engine's own limits queue the rest


def run_batch(engine_config: EngineConfig, server_config: ServerConfig, input_file: str, output_file: str,
              output_tmp_dir: str | None = None, metrics_address: tuple[str, int] | None = None) -> dict:
    """Answers every line of input_file into output_file (each a local path or an http(s) URL, batch_files.py);
    returns the count of lines by status code. metrics_address: (host, port) of the Prometheus listener."""
    from pagedllm.server.batch_files import check_output_tmp_dir, is_url, read_input, upload_output
    from pagedllm.server.launch import check_serve_config
    if not is_url(input_file) and Path(input_file).is_dir():
        raise ValueError(f"--input-file {input_file!r} is a directory, not a JSONL file")
    if is_url(output_file):
        check_output_tmp_dir(output_tmp_dir)
    else:
        _check_local_output(output_file)
    # JSONL lines end at "\n" only: str.splitlines() also splits at U+2028, U+0085, \x0c... which JSON strings
    # may hold raw (json.dumps(ensure_ascii=False)), and would cut a request in two
    lines = read_input(input_file).split("\n")   # a missing file or URL fails before the model
    checks = check_serve_config(engine_config, server_config, time.monotonic())
    # a port in use: found before the model loads
    listener = _MetricsListener(*metrics_address) if metrics_address is not None else None
    try:
        from pagedllm.engine.core_process import CoreClient
        core = CoreClient(engine_config)
        try:
            outputs, counts, died = asyncio.run(_answer_all(engine_config, server_config, checks, core, lines,
                                                            listener))
        finally:
            core.shutdown()
    finally:
        if listener is not None:
            listener.close()
    text = "".join(json.dumps(out, separators=(",", ":")) + "\n" for out in outputs)
    if is_url(output_file):
        upload_output(output_file, text, output_tmp_dir)
    else:
        with open(output_file, "w") as f:
            f.write(text)
    logger.info("run-batch: %d requests answered into %s, by status %s", len(outputs), output_file, counts)
    if died:
        raise RuntimeError("the engine core process died during the batch: the lines after it are errors")
    return counts


def _check_local_output(output_file: str):
    out = Path(output_file)
    if out.is_dir() or not out.parent.is_dir():   # found now, not after every request has run
        raise ValueError(f"--output-file {output_file!r}: " + ("a directory, not a file" if out.is_dir() else
                                                              f"its directory {str(out.parent)!r} does not exist"))
    try:   # writable (permissions, a read-only file system): found now, not after every request has run
        open(output_file, "a").close()
    except OSError as e:
        raise ValueError(f"--output-file {output_file!r} cannot be written: {e}") from None


async def _answer_all(engine_config, server_config, checks, core, lines: list[str],
                      listener: "_MetricsListener | None" = None) -> tuple[list, dict, bool]:
    """Every line's output line, in order; the count by status; whether the core died meanwhile. listener: serves
    the app's /metrics while the lines run."""
    import httpx
    from tqdm import tqdm

    from pagedllm.server.api_server import resolved_api_keys, serving_app
    died = asyncio.Event()
    app, _ = serving_app(engine_config, server_config, checks, core, died.set)
    keys = resolved_api_keys(server_config)
    headers = {"Authorization": f"Bearer {keys[0]}"} if keys else {}
    slots = asyncio.Semaphore(MAX_IN_FLIGHT)
    todo = [(i, line) for i, line in enumerate(lines) if line.strip()]
    seen_ids: dict[str, int] = {}   # custom_id -> its first line (_answer checks before its first await: in order)
    progress = tqdm(total=len(todo), desc="requests", unit="req", disable=len(todo) < 2)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=_logging_errors(app), raise_app_exceptions=False),
            base_url="http://run-batch", headers=headers, timeout=None) as client:

        async def answer(number: int, line: str) -> dict:
            async with slots:
                out = await _answer(client, number, line, seen_ids)
            progress.update()
            return out
        if listener is not None:
            listener.source = (asyncio.get_running_loop(), client)
        try:
            outputs = await asyncio.gather(*(answer(i + 1, line) for i, line in todo))
        finally:
            if listener is not None:
                listener.source = None
    progress.close()
    counts = dict(Counter(out["response"]["status_code"] for out in outputs))
    return outputs, counts, died.is_set()


def _logging_errors(app):
    """The app as uvicorn serves it: a request that meets a bug gets the server's 500, and the exception (which
    Starlette raises again after that response, for the server's log) is logged, not raised on: that line's
    answer is the 500, and the batch goes on."""
    async def logged(scope, receive, send):
        try:
            await app(scope, receive, send)
        except Exception:
            logger.exception("Exception in ASGI application")
            raise
    return logged


async def _answer(client, number: int, line: str, seen_ids: dict[str, int]) -> dict:
    try:
        request = json.loads(line)
    except ValueError as e:
        return _refused(None, f"line {number} is not JSON: {e}", "line")
    except RecursionError:   # one line's error, not the whole batch's
        return _refused(None, f"line {number} is not JSON that can be read: nested too deeply", "line")
    if not isinstance(request, dict):
        return _refused(None, f"line {number} is not a JSON object", "line")
    custom_id = request.get("custom_id")
    if not isinstance(custom_id, str):
        return _refused(None, f"line {number}: custom_id must be a string", "custom_id")
    unknown = sorted(set(request) - LINE_FIELDS)
    if unknown:
        return _refused(custom_id, f"line {number}: unrecognized field {unknown[0]!r} (a line takes "
                                   f"{', '.join(sorted(LINE_FIELDS))})", unknown[0])
    if custom_id in seen_ids:
        return _refused(custom_id, f"line {number}: custom_id {custom_id!r} is also line {seen_ids[custom_id]}'s: "
                                   f"each request's custom_id must be unique", "custom_id")
    seen_ids[custom_id] = number
    if request.get("method", "POST") != "POST":
        return _refused(custom_id, f"line {number}: method must be POST", "method")
    if request.get("url") not in ROUTES:
        return _refused(custom_id, f"line {number}: url must be one of {', '.join(ROUTES)}, got "
                                   f"{request.get('url')!r}", "url")
    body = request.get("body")
    if not isinstance(body, dict):
        return _refused(custom_id, f"line {number}: body must be a JSON object", "body")
    if body.get("stream"):
        return _refused(custom_id, f"line {number}: a batch request is answered whole: stream must be false",
                        "body.stream")
    response = await client.post(request["url"], json=body)
    answer = response.json()
    return _line(custom_id, response.status_code, answer, answer if response.status_code != 200 else None)


def _refused(custom_id: str | None, message: str, param: str) -> dict:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param,
                      "code": "invalid_batch_line"}}
    return _line(custom_id, 400, body, body)


def _line(custom_id: str | None, status: int, body: dict, error: dict | None) -> dict:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
            "response": {"status_code": status, "request_id": f"batch_{uuid.uuid4().hex}", "body": body},
            "error": error}


class _MetricsListener:
    """vLLM's run-batch --enable-metrics: Prometheus text on host:port at any GET path (as prometheus_client's
    start_http_server, which vLLM's uses), from a thread. The text is the app's own GET /metrics (serve's series),
    asked through the batch's client on the batch's loop; 503 while no batch runs (the model loading)."""

    def __init__(self, host: str, port: int):
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                listener._answer(self)

            def log_message(self, *args):   # a scrape every few seconds: not the batch's log
                pass

        class Server(ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
            daemon_threads = True
        try:
            self.server = Server((host, port), Handler)
        except OSError as e:
            raise ValueError(f"--enable-metrics: cannot listen on --host {host!r} --port {port}: {e}") from None
        self.source = None   # (loop, client) while the batch runs
        threading.Thread(target=self.server.serve_forever, name="run-batch-metrics", daemon=True).start()

    def _answer(self, request: BaseHTTPRequestHandler):
        status, body, kind = 503, b"run-batch: no batch is running\n", "text/plain; charset=utf-8"
        source = self.source
        if source is not None:
            loop, client = source
            try:
                response = asyncio.run_coroutine_threadsafe(client.get("/metrics"), loop).result(timeout=30)
                status, body, kind = response.status_code, response.content, response.headers["content-type"]
            except Exception as e:   # the batch ended meanwhile, or a scrape that took too long
                body = f"run-batch: /metrics did not answer: {e!r}\n".encode()
        request.send_response(status)
        request.send_header("Content-Type", kind)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    def close(self):
        self.server.shutdown()
        self.server.server_close()
