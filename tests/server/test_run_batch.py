"""`pagedllm run-batch` (vLLM's run-batch, OpenAI's Batch format): one output line per input line, in order; the
answers are the server's for the same bodies (the same app, in process); lines that are not requests, and
requests the server refuses, are error lines naming the problem, none dropped."""
import json
import subprocess
import sys

import httpx
from server.server_utils import CHAT_TEMPLATE, MAX_MODEL_LEN, MODEL_NAME, NUM_BLOCKS

CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 8,
        "temperature": 0}
COMPLETION = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
RESPONSE = {"model": MODEL_NAME, "input": "Tell me a story", "max_output_tokens": 8, "temperature": 0}


def test_run_batch_answers_every_line_as_the_server_would(tiny_model_dirs, tmp_path, server):
    template = tmp_path / "template.jinja"
    template.write_text(CHAT_TEMPLATE)
    lines = [json.dumps({"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions", "body": CHAT}),
             json.dumps({"custom_id": "completion", "url": "/v1/completions", "body": COMPLETION}),
             "",
             json.dumps({"custom_id": "response", "method": "POST", "url": "/v1/responses", "body": RESPONSE}),
             "{not json",
             json.dumps({"custom_id": "embed", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}),
             json.dumps({"custom_id": "stream", "method": "POST", "url": "/v1/completions",
                         "body": {**COMPLETION, "stream": True}}),
             json.dumps({"custom_id": "bad", "method": "POST", "url": "/v1/completions",
                         "body": {**COMPLETION, "max_tokens": -1}}),
             json.dumps({"method": "POST", "url": "/v1/completions", "body": COMPLETION})]
    source, sink = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("\n".join(lines) + "\n")
    done = subprocess.run([sys.executable, "-m", "pagedllm.cli", "run-batch", tiny_model_dirs["llama"], "-i",
                           str(source), "-o", str(sink), "--served-model-name", MODEL_NAME, "--chat-template",
                           str(template), "--device", "cpu", "--num-gpu-blocks-override", str(NUM_BLOCKS),
                           "--max-model-len", str(MAX_MODEL_LEN), "--log-stats-interval", "0"],
                          capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1",
                                                                             **_env()})
    assert done.returncode == 0, done.stderr[-3000:]
    out = [json.loads(line) for line in sink.read_text().splitlines()]
    assert [o["custom_id"] for o in out] == ["chat", "completion", "response", None, "embed", "stream", "bad",
                                              None]
    assert [o["response"]["status_code"] for o in out] == [200, 200, 200, 400, 400, 400, 400, 400]
    assert all(o["error"] is None for o in out[:3]) and all(o["error"]["error"]["message"] for o in out[3:])
    # vLLM's run-batch: error is the whole error body ({"error": {...}}, its ErrorResponse), not the inner object
    assert all(o["error"] == o["response"]["body"] for o in out[3:])
    assert [o["error"]["error"]["param"] for o in out[3:]] == ["line", "url", "body.stream", "max_tokens", "custom_id"]
    assert len({o["id"] for o in out}) == len(out)
    for o, url, body in ((out[0], "/v1/chat/completions", CHAT), (out[1], "/v1/completions", COMPLETION)):
        served = httpx.post(server.url + url, json=body, headers=server.headers, timeout=60).json()
        assert o["response"]["body"]["choices"] == served["choices"]
        assert o["response"]["body"]["usage"] == served["usage"]
    served = httpx.post(server.url + "/v1/responses", json=RESPONSE, headers=server.headers, timeout=60).json()
    assert out[2]["response"]["body"]["output"][0]["content"] == served["output"][0]["content"]
    assert json.loads(done.stdout.strip().splitlines()[-1])["by_status"] == {"200": 3, "400": 5}


def _env() -> dict:
    import os
    return {k: v for k, v in os.environ.items() if k != "PAGEDLLM_API_KEY"}


def test_paths_that_cannot_work_are_refused_before_the_model_loads(tmp_path, capsys):
    """A directory for the input or the output, an output in a directory that does not exist: an error naming
    the flag at once (a fuzz found the output's failing only after every request had run)."""
    from pagedllm.cli import main
    good = tmp_path / "in.jsonl"
    good.write_text("")
    for args, words in ((["-i", str(tmp_path), "-o", str(tmp_path / "o.jsonl")], "--input-file"),
                        (["-i", str(good), "-o", str(tmp_path)], "--output-file"),
                        (["-i", str(good), "-o", str(tmp_path / "no" / "o.jsonl")], "does not exist")):
        assert main(["run-batch", "--device", "cpu", *args]) == 2
        assert words in capsys.readouterr().err
    # serve's HTTP flags: run-batch has no listener (vLLM's uses --port only for its metrics); they were ignored
    io = ["-i", str(good), "-o", str(tmp_path / "o.jsonl")]
    assert main(["run-batch", "--device", "cpu", *io, "--port", "9000", "--api-key", "k", "--root-path", "/x"]) == 2
    assert ("run-batch serves no HTTP: --port, --api-key, --root-path are serve's"
            in capsys.readouterr().err)
    # vLLM's metrics listener's flags without --enable-metrics: they would place nothing
    assert main(["run-batch", "--device", "cpu", *io, "--url", "0.0.0.0"]) == 2
    assert "run-batch serves no HTTP: --url is serve's" in capsys.readouterr().err


def test_run_batch_lines_end_at_newline_only_and_refuse_unknown_fields_and_repeated_ids(tiny_model_dirs, tmp_path):
    """A raw U+2028 (or U+0085, \\x0c) in a JSON string is part of its line, not a line break; a line's unknown
    field and a custom_id used twice are 400 lines naming them; an output file that cannot be written is an error
    before the model loads."""
    lines = [json.dumps({"custom_id": "sep", "url": "/v1/completions",
                         "body": {**COMPLETION, "prompt": "Once\u2028upon\x85a\x0ctime"}}, ensure_ascii=False),
             json.dumps({"custom_id": "sep", "url": "/v1/completions", "body": COMPLETION}),
             json.dumps({"custom_id": "extra", "url": "/v1/completions", "body": COMPLETION, "metadata": {}})]
    source, sink = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    args = [sys.executable, "-m", "pagedllm.cli", "run-batch", tiny_model_dirs["llama"], "-i", str(source),
            "--served-model-name", MODEL_NAME, "--device", "cpu", "--num-gpu-blocks-override", str(NUM_BLOCKS),
            "--max-model-len", str(MAX_MODEL_LEN), "--log-stats-interval", "0"]
    env = {"OMP_NUM_THREADS": "1", **_env()}
    done = subprocess.run([*args, "-o", str(sink)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = [json.loads(line) for line in sink.read_text(encoding="utf-8").split("\n") if line]
    assert [o["custom_id"] for o in out] == ["sep", "sep", "extra"]
    assert [o["response"]["status_code"] for o in out] == [200, 400, 400]
    assert [o["error"]["error"]["param"] for o in out[1:]] == ["custom_id", "metadata"]
    done = subprocess.run([*args, "-o", "/proc/out.jsonl"], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode != 0 and "cannot be written" in done.stderr


def test_a_line_nested_too_deeply_is_an_error_line():
    """JSON nested past the parser's depth is a line that is not a request (its 400 line), not the end of the
    whole batch with no output file."""
    import asyncio

    from pagedllm.server.run_batch import _answer
    deep = '{"custom_id": "deep", "body": ' + "[" * 100_000 + "]" * 100_000 + "}"
    out = asyncio.run(_answer(None, 3, deep, {}))
    assert out["response"]["status_code"] == 400 and out["error"]["error"]["param"] == "line"
    message = out["error"]["error"]["message"]
    assert "line 3" in message and "nested too deeply" in message


def test_a_line_the_server_fails_on_is_a_500_line_not_the_end_of_the_batch(tmp_path, monkeypatch, caplog):
    """A line whose request meets a bug of the server (its 500, in OpenAI's shape): the app's transport raised the
    exception on to run-batch as well (Starlette raises it again after the 500, for the server's log), so the
    whole batch ended there and wrote no output file, the other lines' answers lost. It is that line's 500 line,
    and the exception is logged, as the server logs it."""
    import asyncio
    from types import SimpleNamespace

    from fastapi import FastAPI

    from pagedllm.server import api_server, run_batch
    from pagedllm.server.errors import install_error_handlers

    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/completions")
    async def completions(body: dict):
        if body["prompt"] == "boom":
            raise RuntimeError("a bug met by this request")
        return {"choices": [{"text": body["prompt"]}]}
    monkeypatch.setattr(api_server, "serving_app", lambda *args: (app, None))
    lines = [json.dumps({"custom_id": str(i), "url": "/v1/completions", "body": {"prompt": p}})
             for i, p in enumerate(["fine", "boom", "also fine"])]
    out, counts, _ = asyncio.run(run_batch._answer_all(None, SimpleNamespace(api_key=[]), None, None, lines))
    assert [o["response"]["status_code"] for o in out] == [200, 500, 200] and counts == {200: 2, 500: 1}
    assert out[1]["error"]["error"]["code"] == "internal_error"
    assert [o["response"]["body"]["choices"][0]["text"] for o in (out[0], out[2])] == ["fine", "also fine"]
    assert "a bug met by this request" in caplog.text and "Traceback" in caplog.text


class _FileHost:
    """A local HTTP host for run-batch's URLs: GET serves `files`, PUT stores the body in `files` (status
    `put_status`, e.g. 503 to fail every upload)."""

    def __init__(self, files: dict[str, bytes], put_status: int = 200):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        host = self
        self.files, self.put_status, self.puts = files, put_status, 0

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                body = host.files.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.end_headers()
                self.wfile.write(body or b"")

            def do_PUT(self):
                host.puts += 1
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if host.put_status == 200:
                    host.files[self.path] = body
                self.send_response(host.put_status)
                self.end_headers()

            def log_message(self, *args):
                pass
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_run_batch_reads_and_writes_http_urls(tiny_model_dirs, tmp_path):
    """vLLM's run-batch takes an http(s) URL for -i (read with GET) and -o (sent with PUT, staged in
    --output-tmp-dir when given); both were refused ("a local file is used here, not a URL"), and
    --output-tmp-dir was an unknown flag."""
    lines = [json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": COMPLETION}),
             json.dumps({"custom_id": "b", "method": "POST", "url": "/v1/completions",
                         "body": {**COMPLETION, "max_tokens": -1}})]
    host = _FileHost({"/in.jsonl": ("\n".join(lines) + "\n").encode()})
    args = [sys.executable, "-m", "pagedllm.cli", "run-batch", tiny_model_dirs["llama"], "-i", host.url + "/in.jsonl",
            "--served-model-name", MODEL_NAME, "--device", "cpu", "--num-gpu-blocks-override", str(NUM_BLOCKS),
            "--max-model-len", str(MAX_MODEL_LEN), "--log-stats-interval", "0"]
    env = {"OMP_NUM_THREADS": "1", **_env()}
    try:
        for out_path, extra in (("/out.jsonl", []), ("/staged.jsonl", ["--output-tmp-dir", str(tmp_path)])):
            done = subprocess.run([*args, "-o", host.url + out_path, *extra], capture_output=True, text=True,
                                  timeout=300, env=env)
            assert done.returncode == 0, done.stderr[-3000:]
            out = [json.loads(line) for line in host.files[out_path].decode().splitlines()]
            assert [o["custom_id"] for o in out] == ["a", "b"]
            assert [o["response"]["status_code"] for o in out] == [200, 400]
        assert not list(tmp_path.iterdir())   # the staged file is removed once uploaded
        done = subprocess.run([*args[:6], host.url + "/missing.jsonl", "-o", str(tmp_path / "o.jsonl")],
                              capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode != 0 and "could not be read" in done.stderr and "404" in done.stderr
    finally:
        host.close()


def test_a_failed_upload_is_retried_and_keeps_the_staged_output(tmp_path, monkeypatch):
    import pytest

    from pagedllm.server import batch_files
    monkeypatch.setattr(batch_files, "UPLOAD_DELAY_S", 0.0)
    host = _FileHost({}, put_status=503)
    try:
        with pytest.raises(RuntimeError, match="the output is kept in") as e:
            batch_files.upload_output(host.url + "/out.jsonl", '{"x":1}\n', str(tmp_path))
        assert host.puts == batch_files.UPLOAD_TRIES and "status 503" in str(e.value)
        [kept] = tmp_path.iterdir()
        assert kept.read_text() == '{"x":1}\n'
        with pytest.raises(ValueError, match="--output-tmp-dir"):
            batch_files.check_output_tmp_dir(str(tmp_path / "none"))
    finally:
        host.close()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_enable_metrics_flags_place_the_listener(tiny_model_dirs, tmp_path, monkeypatch, capsys):
    """vLLM's run-batch --enable-metrics (and --host / --port, its deprecated --url) serves Prometheus metrics
    while the batch runs; the flag was unknown (argparse's usage error). --url and another --host: refused."""
    import pytest

    from pagedllm.cli import main
    from pagedllm.server import run_batch
    seen = []
    monkeypatch.setattr(run_batch, "run_batch", lambda *args: seen.append(args[-1]) or {})
    source = tmp_path / "in.jsonl"
    source.write_text("")
    io = [tiny_model_dirs["llama"], "--device", "cpu", "-i", str(source), "-o", str(tmp_path / "o.jsonl")]
    for flags, address in (([], ("127.0.0.1", 8000)), (["--host", "0.0.0.0", "--port", "9100"], ("0.0.0.0", 9100)),
                           (["--url", "0.0.0.0"], ("0.0.0.0", 8000))):
        assert main(["run-batch", *io, "--enable-metrics", *flags]) == 0
        assert seen.pop() == address
    assert main(["run-batch", *io]) == 0 and seen.pop() is None
    assert main(["run-batch", *io, "--enable-metrics", "--url", "0.0.0.0", "--host", "10.0.0.1"]) == 2
    assert "--url is vLLM's old name of --host" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--port"):   # a port in use: refused at once, not after the model loads
        with __import__("socket").create_server(("127.0.0.1", 0)) as taken:
            run_batch._MetricsListener("127.0.0.1", taken.getsockname()[1])


def test_enable_metrics_serves_the_apps_metrics_while_the_batch_runs(monkeypatch):
    """The listener answers any GET path with the app's own /metrics (serve's series, its content type), asked on
    the batch's loop while the lines run; 503 before the batch starts."""
    import asyncio

    from fastapi import FastAPI, Response

    from pagedllm.server import api_server, run_batch
    from pagedllm.server.metrics import ServerMetrics

    port = _free_port()
    metrics = ServerMetrics("m")
    app = FastAPI()

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(None), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/completions")
    async def completions(body: dict):   # scrapes the listener mid-batch (from a thread: it asks this loop)
        scraped = await asyncio.to_thread(httpx.get, f"http://127.0.0.1:{port}/any/path", timeout=30)
        return {"status": scraped.status_code, "type": scraped.headers["content-type"], "text": scraped.text}
    monkeypatch.setattr(api_server, "serving_app", lambda *args: (app, None))
    listener = run_batch._MetricsListener("127.0.0.1", port)
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).status_code == 503   # no batch yet
        line = json.dumps({"custom_id": "a", "url": "/v1/completions", "body": {"prompt": "x"}})
        out, _, _ = asyncio.run(run_batch._answer_all(None, type("C", (), {"api_key": []})(), None, None, [line],
                                                      listener))
    finally:
        listener.close()
    answer = out[0]["response"]["body"]
    assert answer["status"] == 200 and answer["type"].startswith("text/plain"), answer
    assert 'pagedllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 0.0' in answer["text"]
