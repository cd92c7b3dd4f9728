"""A Hub id as --tokenizer or --model while the Hub cannot be reached: one quick error naming the field and why,
not ~50 s of the hub client's retries; a hub that answers still serves the download.

Each case runs the CLI in a child process, because huggingface_hub reads HF_HUB_OFFLINE and HF_ENDPOINT once,
at import."""
import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pagedllm.config import DEMO_MODEL

REPO = Path(__file__).resolve().parents[2]
HUB_ID = "Qwen/Qwen3-0.6B"

# The child times the CLI call alone (its imports cost seconds on a busy machine and are not what is tested).
_CHILD = """
import contextlib, io, json, sys, time
from pagedllm.cli import main
err = io.StringIO()
start = time.monotonic()
with contextlib.redirect_stderr(err):
    code = main(sys.argv[1:])
print(json.dumps({"code": code, "seconds": time.monotonic() - start, "err": err.getvalue()}))
"""


def _run_cli(env: dict, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), **env}
    done = subprocess.run([sys.executable, "-c", _CHILD, "generate", "--device", "cpu", "--max-tokens", "4",
                           *args, "Once"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("env, why", [
    ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
    ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "the Hugging Face Hub at http://127.0.0.1:9 could not be reached"),
], ids=["offline", "refused"])
def test_a_hub_tokenizer_fails_at_once_naming_the_field_and_why(tmp_path, env, why):
    """Was ~46 s (five retries with backoff, for each of two files) and then transformers' "We couldn't connect
    to 'https://huggingface.co'", which named neither the flag nor HF_HUB_OFFLINE."""
    out = _run_cli({**env, "HF_HOME": str(tmp_path)}, "--model", DEMO_MODEL, "--tokenizer", HUB_ID)
    assert out["code"] == 2 and out["seconds"] < 10, out
    assert f"tokenizer {HUB_ID!r} is not a local directory" in out["err"] and why in out["err"], out["err"]


def test_a_hub_model_fails_at_once_naming_the_field(tmp_path):
    """The model is never downloaded here: its error must not wait on the hub either."""
    out = _run_cli({"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path)}, "--model", HUB_ID)
    assert out["code"] == 2 and out["seconds"] < 10, out
    assert f"model {HUB_ID!r} is not a local directory" in out["err"], out["err"]


class _FakeHub(BaseHTTPRequestHandler):
    """HEAD/GET /{org}/{name}/resolve/{rev}/{file}, served from the demo model's directory; 404 otherwise."""
    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)

    def _answer(self, body: bool):
        parts = self.path.split("?")[0].strip("/").split("/")
        file = Path(DEMO_MODEL) / parts[-1]
        if len(parts) == 5 and parts[2] == "resolve" and file.is_file():
            data = file.read_bytes()
            self.send_response(200)
            self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
            self.send_header("X-Repo-Commit", "0" * 40)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)
            return
        self.send_response(404)
        self.send_header("X-Error-Code", "EntryNotFound")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_reachable_hub_still_downloads_the_tokenizer_and_its_cache_serves_offline(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        out = _run_cli({"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path)},
                       "--model", DEMO_MODEL, "--tokenizer", HUB_ID)
    finally:
        server.shutdown()
    assert out["code"] == 0, out
    assert list((tmp_path / "hub").glob("models--Qwen--Qwen3-0.6B/snapshots/*/tokenizer.json")), "not downloaded"
    out = _run_cli({"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path)},
                   "--model", DEMO_MODEL, "--tokenizer", HUB_ID)
    assert out["code"] == 0, out   # the hub gone, the cached copy is used (and at once)
