"""vLLM 0.26's profiler surface (--profiler-config; pagedllm/profiler.py): LLM's and AsyncLLM's start_profile /
stop_profile and the server's POST /start_profile, /stop_profile write torch.profiler traces into
torch_profiler_dir, a file per rank; without a profiler configured they raise (the routes are 404s)."""
import asyncio
import gzip
import json
import os
import time

import pytest
from fastapi.testclient import TestClient

from pagedllm import LLM, SamplingParams
from pagedllm.config import EngineConfig, ServerConfig
from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.engine.engine_args import EngineArgs
from pagedllm.profiler import ProfilerConfig
from pagedllm.server.api_server import serving_app
from pagedllm.server.launch import ServeChecks
from pagedllm.vllm_argv import json_keys

ENGINE = dict(device="cpu", log_stats_interval=0, num_gpu_blocks_override=64, max_model_len=128)


def _traces(directory) -> list[str]:
    return sorted(f for f in os.listdir(directory) if f.endswith(".pt.trace.json.gz"))


def test_llm_start_generate_stop_writes_a_gzipped_trace_per_profile(tiny_model_dirs, tmp_path):
    """Was a NotImplementedError ("not built"). Each start ... stop writes rank 0's trace (torch's
    tensorboard_trace_handler, gzipped by default), named as vLLM's workers name theirs, with the start's prefix."""
    llm = LLM(tiny_model_dirs["llama"], profiler_config={"profiler": "torch", "torch_profiler_dir": str(tmp_path),
                                                         "torch_profiler_with_stack": False}, **ENGINE)   # with the
    # stack, torch 2.13 at times fails to decode an event name for the table (the trace is written; logged)
    llm.start_profile()
    llm.generate(["hello there"], SamplingParams(max_tokens=4), use_tqdm=False)
    llm.stop_profile()
    [trace] = _traces(tmp_path)
    assert trace.startswith("dp0_pp0_tp0_dcp0_ep0_rank0.")
    events = json.loads(gzip.open(tmp_path / trace).read())["traceEvents"]
    assert any(e.get("name", "").startswith("execute_1_requests_") for e in events)   # each step annotated
    assert (tmp_path / "profiler_out_0.txt").stat().st_size > 0   # the operators' table, vLLM's file
    llm.start_profile("decode")
    llm.generate(["again"], SamplingParams(max_tokens=2), use_tqdm=False)
    llm.stop_profile()
    assert [t for t in _traces(tmp_path) if t != trace][0].startswith("decode_dp0_pp0_tp0_dcp0_ep0_rank0.")


def test_start_profile_without_a_profiler_config_raises_naming_the_flag(tiny_model_dirs):
    llm = LLM(tiny_model_dirs["llama"], **ENGINE)
    for call in (llm.start_profile, llm.stop_profile):
        with pytest.raises(RuntimeError, match="Profiling is not enabled: set --profiler-config"):
            call()


@pytest.mark.parametrize("config, words", [
    ({"profiler": "torch", "torch_profiler_dir": "/t", "no_such_key": 1}, "profiler_config.no_such_key is not a"),
    ({"profiler": "torch"}, "profiler_config.torch_profiler_dir must be set when profiler is torch"),
    ({"torch_profiler_dir": "/t"}, "profiler_config.torch_profiler_dir must be empty unless profiler is torch"),
    ({"profiler": "nsys"}, "profiler_config.profiler must be None or one of"),
    ({"profiler": "torch", "torch_profiler_dir": "/t", "warmup_iterations": 2}, "profiler_config.warmup_iterations:"
                                                                                " the profiler schedule"),
    ({"profiler": "torch", "torch_profiler_dir": "/t", "capture_torch_profiler": True},
     "profiler_config.capture_torch_profiler: tracing CUDA graph capture"),
    ({"profiler": "torch", "torch_profiler_dir": "/t", "max_iterations": -1}, "profiler_config.max_iterations must"),
    ({"profiler": "torch", "torch_profiler_dir": "/t", "torch_profiler_use_gzip": "yes"},
     "profiler_config.torch_profiler_use_gzip must be True or False"),
])
def test_a_bad_or_unbuilt_profiler_config_key_is_refused_naming_it(config, words):
    with pytest.raises(ValueError, match=words):
        EngineConfig(device="cpu", profiler_config=config)


def test_the_flag_takes_vllms_dotted_keys_and_engine_args_hold_a_profiler_config(tmp_path):
    """vLLM's spelling: --profiler-config.profiler=torch --profiler-config.torch_profiler_dir=DIR; vLLM's scripts
    read engine_args.profiler_config.profiler (its benchmarks: None when off)."""
    argv = json_keys(["--profiler-config.profiler=torch", f"--profiler-config.torch_profiler_dir={tmp_path}",
                      "--profiler-config.torch_profiler_with_stack", "false"])
    config = EngineConfig(device="cpu", profiler_config=argv[-1])
    assert config.profiler_config == ProfilerConfig("torch", str(tmp_path), torch_profiler_with_stack=False)
    assert EngineArgs().profiler_config.profiler is None
    args = EngineArgs(profiler_config=argv[-1])
    assert args.profiler_config.torch_profiler_dir == str(tmp_path)
    assert args.create_engine_config().profiler_config == config.profiler_config
    assert EngineConfig(device="cpu", profiler_config={"profiler": "torch", "torch_profiler_dir": "rel"}) \
        .profiler_config.torch_profiler_dir == os.path.abspath("rel")   # vLLM's: made absolute


def test_max_iterations_stops_the_trace_before_stop_profile(tiny_model_dirs, tmp_path):
    """delay_iterations / max_iterations, vLLM's: the trace is written after max_iterations steps."""
    llm = LLM(tiny_model_dirs["llama"], profiler_config={"profiler": "torch", "torch_profiler_dir": str(tmp_path),
                                                         "delay_iterations": 2, "max_iterations": 2}, **ENGINE)
    llm.start_profile()
    llm.generate(["a"], SamplingParams(max_tokens=1), use_tqdm=False)   # one step: delayed, nothing recorded
    assert llm.engine.runner.profiler.running is None and not _traces(tmp_path)
    llm.generate(["b"], SamplingParams(max_tokens=8), use_tqdm=False)   # past the limit
    assert llm.engine.runner.profiler.running is None and len(_traces(tmp_path)) == 1
    llm.stop_profile()
    assert len(_traces(tmp_path)) == 1


def test_server_routes_are_served_only_with_a_profiler_and_write_the_traces(tiny_model_dirs, tmp_path):
    """The server's POST /start_profile and /stop_profile (a 404 without --profiler-config: test_server_routes.py):
    200s, the engine core process's trace and the API process's own (vLLM's AsyncLLM frontend trace)."""
    config = EngineConfig(tiny_model_dirs["llama"], profiler_config={"profiler": "torch",
                                                                      "torch_profiler_dir": str(tmp_path)}, **ENGINE)
    app, ctx = serving_app(config, ServerConfig(), ServeChecks(None, [], time.monotonic()), None, lambda: None)
    try:
        with TestClient(app) as client:
            assert client.post("/start_profile").status_code == 200
            r = client.post("/v1/completions", json={"model": config.model, "prompt": "hi", "max_tokens": 3})
            assert r.status_code == 200, r.text
            assert client.post("/stop_profile").status_code == 200
    finally:
        ctx.engine.shutdown()
    traces = _traces(tmp_path)
    assert len(traces) == 2 and traces[0].startswith("dp0_pp0_tp0_dcp0_ep0_rank0."), traces
    assert ".async_llm." in traces[1], traces


def test_async_llm_ignore_frontend_traces_the_core_only(tiny_model_dirs, tmp_path):
    async def main():
        engine = AsyncLLM(EngineConfig(tiny_model_dirs["llama"], profiler_config={
            "profiler": "torch", "torch_profiler_dir": str(tmp_path), "ignore_frontend": True}, **ENGINE))
        try:
            await engine.start_profile("p")
            async for _ in engine.generate("hi", SamplingParams(max_tokens=2), "r"):
                pass
            await engine.stop_profile()
        finally:
            engine.shutdown()
    asyncio.run(main())
    [trace] = _traces(tmp_path)
    assert trace.startswith("p_dp0_pp0_tp0_dcp0_ep0_rank0.")


def test_tensor_parallel_ranks_each_write_their_own_trace(tiny_model_dirs, tmp_path):
    """vLLM's: every worker profiles into its own file (rank 1 runs in a worker process here)."""
    llm = LLM(tiny_model_dirs["llama"], tensor_parallel_size=2,
              profiler_config={"profiler": "torch", "torch_profiler_dir": str(tmp_path)}, **ENGINE)
    try:
        llm.start_profile()
        llm.generate(["hello"], SamplingParams(max_tokens=3), use_tqdm=False)
        llm.stop_profile()
        deadline = time.monotonic() + 30   # rank 1 writes its trace on its own process, after the call
        while len(_traces(tmp_path)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        llm.engine.shutdown()
    assert [t.split(".")[0] for t in _traces(tmp_path)] == ["dp0_pp0_tp0_dcp0_ep0_rank0",
                                                             "dp0_pp0_tp1_dcp0_ep0_rank1"]
