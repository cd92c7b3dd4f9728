"""A client that goes away aborts its request: its KV blocks are free again, as /metrics shows."""
import json
import os
import socket
import time

import httpx
from server.server_utils import MODEL_NAME, engine_metrics, finished, wait_all_blocks_free

LONG = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 480, "ignore_eos": True}


def _wait_running(server, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while (m := engine_metrics(server))["pagedllm:num_requests_running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    return m


def test_streaming_client_disconnect_frees_blocks(server):
    wait_all_blocks_free(server)
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as client:
        with client.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            during = engine_metrics(server)
            assert during["pagedllm:num_requests_running"] == 1 and during["pagedllm:kv_cache_usage_perc"] > 0
        # the connection closes here, long before 480 tokens
    after = wait_all_blocks_free(server)
    assert after["pagedllm:kv_cache_usage_perc"] == 0.0 and after["pagedllm:num_requests_running"] == 0
    print("DBG", during, after)
    assert finished(after, "length") == finished(during, "length")   # aborted, not run to its end


def test_non_streaming_client_disconnect_frees_blocks(server):
    """A non-streaming request sends nothing until it is done: open a raw socket, see the request run,
    then close the socket."""
    before = wait_all_blocks_free(server)
    log_start = os.path.getsize(server.log_path)
    host, port = server.url.removeprefix("http://").split(":")
    body = json.dumps(LONG).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {server.api_key}\r\nContent-Length: {len(body)}\r\n\r\n")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(head.encode() + body)
        assert _wait_running(server)["pagedllm:num_requests_running"] == 1
    after = wait_all_blocks_free(server)
    assert after["pagedllm:kv_cache_usage_perc"] == 0.0 and after["pagedllm:num_requests_running"] == 0
    assert finished(after, "length") == finished(before, "length")
    with open(server.log_path) as f:   # the handler saw the disconnect and ended cleanly (was: InvalidStateError)
        f.seek(log_start)
        log = f.read()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log
