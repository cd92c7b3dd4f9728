"""Faults, on dedicated `pagedllm serve` processes (each test here ends or stops its server): a request whose
data raises in the engine core fails alone; a stopped core makes /health 503 and fails the requests in flight;
a killed core makes the server exit non-zero; SIGINT and SIGTERM stop it cleanly with exit code 0."""
import asyncio
import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from server.inject_fault import INJECT_SEED, SLOW_SEEDS
from server.server_utils import MODEL_NAME, Server, serving, spawned_children, start_server, wait_healthy

from pagedllm.server.api_server import STOP_GRACE_SECONDS

HEARTBEAT_TIMEOUT = 2.0
STEP_TIMEOUT = 6.0
COMPLETIONS = "/v1/completions"
PROMPTS = ["Once upon a time", "The little dog", "In a small town there", "She said"]


@pytest.fixture(scope="module")
def fault_servers(tiny_model_dirs, tmp_path_factory):
    """Started at once (start-up is most of their cost): "inject" has a fault injected for seed INJECT_SEED,
    "kill" has its core killed, "term" is stopped with SIGTERM (its heartbeat timeout outlasts the stop's grace)."""
    logs = tmp_path_factory.mktemp("fault_logs")
    script = str(Path(__file__).with_name("inject_fault.py"))
    flags = ("--engine-heartbeat-timeout", str(HEARTBEAT_TIMEOUT), "--engine-step-timeout", str(STEP_TIMEOUT))
    servers = {"inject": start_server(tiny_model_dirs["llama"], str(logs / "inject.log"), None, *flags,
                                      main=(script,)),
               "kill": start_server(tiny_model_dirs["llama"], str(logs / "kill.log"), None, *flags),
               "term": start_server(tiny_model_dirs["llama"], str(logs / "term.log"), None,
                                    "--engine-heartbeat-timeout", "30")}
    with serving(servers):
        yield servers


def _core_pid(server: Server) -> int:
    """The engine core: the server process's one spawned child."""
    children = spawned_children(server.process.pid)
    assert len(children) == 1, f"the server has {len(children)} spawned processes, not its engine core alone"
    return children[0]


def _body(prompt: str, **kw) -> dict:
    return {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 8, "temperature": 0.0, **kw}


async def _stream_events(client: httpx.AsyncClient, server: Server, body: dict) -> list:
    """The events of a streamed completion: choices' JSON, or the error event; a stream that fails before its
    first output is an HTTP error (its status line waits for that output): its body is the one event."""
    events = []
    async with client.stream("POST", server.url + COMPLETIONS, json={**body, "stream": True}) as r:
        if r.status_code != 200:
            assert r.status_code == 500, r.status_code
            return [json.loads(await r.aread())]
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    return events


async def _long_streams(client: httpx.AsyncClient, server: Server, max_tokens: int) -> list[asyncio.Task]:
    """A sampled stream per prompt that outlasts the test's fault, given 0.3 s to send its first tokens."""
    streams = [asyncio.create_task(_stream_events(
        client, server, _body(p, max_tokens=max_tokens, ignore_eos=True, temperature=1.0))) for p in PROMPTS]
    await asyncio.sleep(0.3)
    return streams


def _stop_and_check_clean(server: Server, sig: int):
    """A stop signal: exit code 0, and after it no traceback and no error line in the log."""
    offset = os.path.getsize(server.log_path)
    # Ctrl-C in a terminal reaches its whole process group, the core too; so do `timeout` and systemd's stop
    os.kill(_core_pid(server), sig)
    server.process.send_signal(sig)
    assert server.process.wait(timeout=20) == 0
    tail = Path(server.log_path).read_text()[offset:]
    for word in ("Traceback", "Error", "ERROR"):
        assert word not in tail, tail


def test_request_failing_in_core_fails_alone(fault_servers):
    server = fault_servers["inject"]

    async def run():
        async with httpx.AsyncClient(timeout=60) as client:
            good = [client.post(server.url + COMPLETIONS, json=_body(p)) for p in PROMPTS]
            bad = client.post(server.url + COMPLETIONS, json=_body(PROMPTS[0], seed=INJECT_SEED, n=2))
            bad_stream = _stream_events(client, server, _body(PROMPTS[1], seed=INJECT_SEED))
            results = await asyncio.gather(*good[:2], bad, bad_stream, *good[2:])
            alone = [await client.post(server.url + COMPLETIONS, json=_body(p)) for p in PROMPTS]
            return results, alone

    results, alone = asyncio.run(run())
    bad, bad_events = results[2], results[3]
    assert bad.status_code == 500
    error = bad.json()["error"]
    assert error["code"] == "engine_error" and "not iterable" in error["message"] and set(error) == {
        "message", "type", "param", "code"}
    assert "not iterable" in bad_events[-1]["error"]["message"]
    good = results[:2] + results[4:]
    assert all(r.status_code == 200 for r in good + alone)
    assert [r.json()["choices"][0]["text"] for r in good] == [r.json()["choices"][0]["text"] for r in alone]
    assert httpx.get(server.url + "/health").status_code == 200


def _health_during(server: Server, body: dict, seconds: float) -> tuple[httpx.Response, list[int]]:
    """Sends a completion and reads /health every 0.25 s while it runs (at most `seconds`)."""
    async def run():
        async with httpx.AsyncClient(timeout=60) as client:
            request = asyncio.create_task(client.post(server.url + COMPLETIONS, json=body))
            statuses, start = [], time.monotonic()
            while not request.done() and time.monotonic() - start < seconds:
                statuses.append((await client.get(server.url + "/health")).status_code)
                await asyncio.sleep(0.25)
            return await request, statuses
    return asyncio.run(run())


def test_a_long_step_is_not_a_stopped_core_but_one_past_the_step_timeout_is_hung(fault_servers):
    """The heartbeat comes from a thread of the core: a pass of its loop longer than the heartbeat timeout
    (3.5 s > 2 s) keeps /health 200 and finishes; one past the step timeout (12 s > 6 s) makes /health 503 and
    fails its request; the core then recovers."""
    server = fault_servers["inject"]
    slow, hung = sorted(SLOW_SEEDS, key=SLOW_SEEDS.get)
    response, statuses = _health_during(server, _body(PROMPTS[0], seed=slow), 15)
    assert response.status_code == 200 and set(statuses) == {200} and len(statuses) >= 10, statuses
    response, statuses = _health_during(server, _body(PROMPTS[0], seed=hung), 20)
    assert response.status_code == 500 and "more than 6 s" in response.json()["error"]["message"], response.text
    # failed within ~8 s of the 12 s: the core is still stuck, and /health says so
    assert statuses[0] == 200 and httpx.get(server.url + "/health").status_code == 503, statuses
    wait_healthy(server, timeout=20)
    assert httpx.post(server.url + COMPLETIONS, json=_body(PROMPTS[0])).status_code == 200


def test_stopped_core_is_unhealthy_and_fails_requests_in_flight(fault_servers):
    server = fault_servers["inject"]
    core = _core_pid(server)

    async def run():
        async with httpx.AsyncClient(timeout=60) as client:
            stream = asyncio.create_task(_stream_events(
                client, server, _body(PROMPTS[0], max_tokens=400, ignore_eos=True, temperature=1.0)))
            await asyncio.sleep(0.3)   # its first tokens are out
            os.kill(core, signal.SIGSTOP)
            stopped_at = time.monotonic()
            try:
                while (await client.get(server.url + "/health")).status_code == 200:
                    assert time.monotonic() - stopped_at < HEARTBEAT_TIMEOUT + 3, "/health stayed 200"
                    await asyncio.sleep(0.2)
                events = await asyncio.wait_for(stream, HEARTBEAT_TIMEOUT + 3)
                assert "has not responded" in events[-1]["error"]["message"]
            finally:
                os.kill(core, signal.SIGCONT)
            while (await client.get(server.url + "/health")).status_code != 200:
                assert time.monotonic() - stopped_at < HEARTBEAT_TIMEOUT + 10, "/health did not recover"
                await asyncio.sleep(0.2)
            return await client.post(server.url + COMPLETIONS, json=_body(PROMPTS[0]))

    assert asyncio.run(run()).status_code == 200
    _stop_and_check_clean(server, signal.SIGINT)


def test_killed_core_fails_streams_and_the_server_exits_non_zero(fault_servers):
    server = fault_servers["kill"]
    core = _core_pid(server)

    async def run():
        async with httpx.AsyncClient(timeout=60) as client:
            streams = await _long_streams(client, server, max_tokens=400)
            os.kill(core, signal.SIGKILL)
            return await asyncio.wait_for(asyncio.gather(*streams, return_exceptions=True), 10)

    killed_at = time.monotonic()
    results = asyncio.run(run())
    for events in results:   # an error event, or a connection cut by the exit
        assert isinstance(events, httpx.TransportError) or "exited" in events[-1]["error"]["message"], events
    assert server.process.wait(timeout=10) == 1
    assert time.monotonic() - killed_at < 10
    assert "engine core process exited unexpectedly (code -9)" in Path(server.log_path).read_text()


def test_sigterm_stops_cleanly_ending_streams_in_flight(fault_servers):
    """Streams that cannot finish (the core is stopped) end with an error event after the stop's grace period
    (STOP_GRACE_SECONDS), then the server exits 0 with no error line."""
    server = fault_servers["term"]
    assert httpx.post(server.url + COMPLETIONS, json=_body(PROMPTS[0])).status_code == 200
    core = _core_pid(server)

    async def run():
        async with httpx.AsyncClient(timeout=60) as client:
            streams = await _long_streams(client, server, max_tokens=480)
            os.kill(core, signal.SIGSTOP)
            offset = os.path.getsize(server.log_path)
            server.process.send_signal(signal.SIGTERM)
            try:
                results = await asyncio.wait_for(asyncio.gather(*streams), STOP_GRACE_SECONDS + 5)
            finally:
                os.kill(core, signal.SIGCONT)
            return results, offset

    results, offset = asyncio.run(run())
    for events in results:
        assert "shutting down" in events[-1]["error"]["message"], events[-1]
    assert server.process.wait(timeout=20) == 0
    tail = Path(server.log_path).read_text()[offset:]
    assert not any(word in tail for word in ("Traceback", "Error", "ERROR")), tail
