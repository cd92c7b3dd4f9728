"""`pagedllm serve --api-server-count N`: several API processes on one port in front of one engine core. Requests
spread over them and give offline LLM.generate's tokens (base and a --lora-modules adapter, plain and streamed);
/metrics sums them all; a stop signal ends all cleanly, and a dead API process or core stops the whole server
with exit code 1. (The waiting-queue bound they share: tests/unit/test_queue_bound.py.)"""
import asyncio
import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from e2e.test_lora import ADAPTERS, make_adapter
from server.server_utils import (CHAT_TEMPLATE, MODEL_NAME, engine_metrics, finished, serving, spawned_children,
                                 start_server)
from server.test_lora_server import FLAGS as LORA_FLAGS
from server.test_lora_server import MAX_TOKENS, PROMPTS

from pagedllm import LoRARequest, SamplingParams

NUM_API = 3


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    """A server of NUM_API API processes with one adapter ("rs"); its metric files in a directory of ours."""
    from conftest import make_tiny_model
    root = tmp_path_factory.mktemp("api_servers")
    base = make_tiny_model(root / "base")
    adapter = make_adapter(base, root / "rs", 0, **ADAPTERS["rs"])
    (root / "metrics").mkdir()
    server = start_server(base, str(root / "serve.log"), None, "--api-server-count", str(NUM_API), *LORA_FLAGS,
                          "--served-model-name", MODEL_NAME, "tiny-alias",   # a second name (the flag given again
                          # replaces start_server's, as vLLM's)
                          "--chat-template", CHAT_TEMPLATE,
                          "--lora-modules", f"rs={adapter}", env={"PROMETHEUS_MULTIPROC_DIR": str(root / "metrics")})
    with serving({"multi": server}):
        yield base, adapter, server, root / "metrics"


@pytest.fixture(scope="module")
def offline(multi):
    from pagedllm import LLM
    base, adapter, _, _ = multi
    llm = LLM(base, dtype="float32", device="cpu", log_stats_interval=0, enable_lora=True, max_loras=2)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    texts = {}
    for name, lora in ((MODEL_NAME, None), ("rs", LoRARequest("rs", 1, adapter))):
        for out, prompt in zip(llm.generate(PROMPTS, params, use_tqdm=False, lora_request=lora), PROMPTS):
            texts[name, prompt] = out.outputs[0].text
    return texts


async def _complete(url: str, model: str, prompt: str, stream: bool) -> str:
    """One request on a connection of its own (the kernel hands each new connection to one API process)."""
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True,
            "stream": stream}
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        if not stream:
            r = await client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]
        text = ""
        async with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
        return text


def _successes_by_process(metrics_dir: Path) -> dict[str, float]:
    """Finished requests counted by each API process (its counter file, named by its pid)."""
    from prometheus_client.mmap_dict import MmapedDict
    counts = {}
    for path in glob.glob(str(metrics_dir / "counter_*.db")):
        values = MmapedDict.read_all_values_from_file(path)
        counts[path] = sum(v[1] for v in values if "request_success" in v[0])
    return counts


def test_requests_spread_over_processes_and_match_offline(multi, offline):
    _, _, server, metrics_dir = multi
    cases = [(model, prompt, stream) for model in (MODEL_NAME, "rs") for prompt in PROMPTS for stream in (False, True)]
    done = 0
    for _ in range(5):   # a burst of new connections lands on several processes; rarely all on one
        async def burst():
            return await asyncio.gather(*(_complete(server.url, *case) for case in cases))
        texts = asyncio.run(burst())
        for (model, prompt, _), text in zip(cases, texts):
            assert text == offline[model, prompt], (model, prompt)
        done += len(cases)
        served = [n for n in _successes_by_process(metrics_dir).values() if n > 0]
        if len(served) >= 2:
            break
    assert len(served) >= 2, f"one API process served all {done} requests"
    assert sum(served) == done
    # /metrics of whichever process answers sums them all; the engine's gauges come from the shared core
    metrics = engine_metrics(server)
    assert finished(metrics, "length") == done
    assert metrics["pagedllm:e2e_request_latency_seconds_count"] == done
    assert metrics["pagedllm:num_requests_running"] == 0


def test_models_and_adapters_in_every_process(multi, offline):
    _, _, server, _ = multi
    for _ in range(2 * NUM_API):   # new connections: every process answers some
        with httpx.Client(base_url=server.url) as client:
            ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert ids == [MODEL_NAME, "tiny-alias", "rs"]
    # either served name is the base model
    assert asyncio.run(_complete(server.url, "tiny-alias", PROMPTS[0], False)) == offline[MODEL_NAME, PROMPTS[0]]
    # and the answer names it by the first name, as vLLM's models.model_name; an empty model is the base model
    # too (vLLM's _is_model_supported); an adapter names itself
    for path, body in (("/v1/completions", {"prompt": PROMPTS[0]}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})):
        for model, named in (("tiny-alias", MODEL_NAME), ("", MODEL_NAME), ("rs", "rs")):
            for stream in (False, True):
                r = httpx.post(server.url + path, json={"model": model, "max_tokens": 2, "stream": stream, **body},
                               timeout=60)
                assert r.status_code == 200, r.text
                first = json.loads(r.text.split("\n")[0][6:]) if stream else r.json()
                assert first["model"] == named, (path, model, stream)


def test_stop_signal_ends_every_process_cleanly(multi):
    """Last in this module: it stops the server. A stream in flight finishes; exit code 0; no process is left."""
    _, _, server, _ = multi
    children = spawned_children(server.process.pid)
    assert len(children) >= NUM_API + 1   # the core and the API processes (and the resource tracker)

    async def stream_then_stop():
        task = asyncio.create_task(_complete(server.url, MODEL_NAME, PROMPTS[0], True))
        await asyncio.sleep(0.2)
        server.process.send_signal(signal.SIGTERM)
        return await task
    assert asyncio.run(stream_then_stop())
    assert server.process.wait(timeout=60) == 0
    _wait_gone(children)


@pytest.fixture(scope="module")
def doomed(tiny_model_dirs, tmp_path_factory):
    """Two servers of two API processes each, started at once: one to lose its core, one an API process."""
    logs = tmp_path_factory.mktemp("api_servers_faults")
    started = {name: start_server(tiny_model_dirs["llama"], str(logs / f"{name}.log"), None,
                                  "--api-server-count", "2", "--engine-heartbeat-timeout", "3")
               for name in ("core", "api")}
    with serving(started):
        yield started


@pytest.mark.parametrize("victim", ["core", "api"])
def test_a_dead_process_stops_the_server(doomed, victim):
    server = doomed[victim]
    children = spawned_children(server.process.pid)
    core, *apis = children   # spawned in this order: the core first
    os.kill(core if victim == "core" else apis[-1], signal.SIGKILL)
    assert server.process.wait(timeout=60) == 1
    _wait_gone(children)
    log = Path(server.log_path).read_text()
    assert ("the engine core process died" if victim == "core" else "exited with code -9: stopping the server") in log


@pytest.mark.parametrize("flags,env,error", [
    (("--api-server-count", "0"), {}, "api_server_count must be an integer in [1, 64], got 0"),
    (("--api-server-count", "2", "--enable-lora"), {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"},
     "loading adapters at run time needs --api-server-count 1, not 2"),
])
def test_refused_configurations(tiny_model_dirs, flags, env, error):
    result = subprocess.run([sys.executable, "-m", "pagedllm.cli", "serve", tiny_model_dirs["llama"], "--device", "cpu",
                             "--port", "0", *flags], capture_output=True, text=True, timeout=120,
                            env={**os.environ, **env})
    assert result.returncode == 2
    assert error in result.stderr


def _wait_gone(pids: list[int], timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while any(Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) for pid in pids):
        assert time.monotonic() < deadline, f"processes left: {pids}"
        time.sleep(0.2)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"
