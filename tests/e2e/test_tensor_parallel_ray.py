"""The Ray executor on a local CPU Ray cluster this module starts as Ray's docs say (`ray start --head`, then
`ray start --address=...` for a second node; one CPU each, so rank 0's bundle fills the engine's node and rank 1
lands on the other): TP=2 gives TP=1's greedy tokens and logprobs (TP=1: the unsplit model, the independent
reference); a killed rank-1 actor ends the engine with WorkerDiedError within seconds; a cluster too small is a
ValueError naming tensor_parallel_size. The engine finds the cluster through RAY_ADDRESS (ray.init("auto")).

Each node runs `ray start --block`, stopped by its pid (SIGTERM: it stops its node's Ray processes), rather than
`ray stop`, which would stop every Ray process of this user on the machine."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

from conftest import make_tiny_model   # noqa: E402
from pagedllm import LLM, SamplingParams   # noqa: E402
from pagedllm.distributed.executor import WorkerDiedError   # noqa: E402

PROMPTS = [[1] + [5 + (7 * i + j) % 400 for j in range(n)] for i, n in enumerate((0, 6, 40, 75))]
ENGINE = dict(device="cpu", log_stats_interval=0, max_num_batched_tokens=32, max_model_len=256)
START_TIMEOUT = 90.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _start_node(args: list[str], log: Path) -> subprocess.Popen:
    """`ray start ... --block` with its own ports (two nodes share this machine), running when it returns."""
    ports = ["node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "runtime-env-agent-port", "metrics-export-port"]
    cmd = [str(Path(sys.executable).with_name("ray")), "start", *args, "--num-cpus=1", "--num-gpus=0",
           "--object-store-memory=100000000", "--disable-usage-stats", "--block",
           *(f"--{p}={_free_port()}" for p in ports)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))   # the actors import this checkout's pagedllm
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT
    while "block forever" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            pytest.fail(f"`ray start` did not start: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM: `ray start --block` stops its node's processes; then whatever of its group is left."""
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


@pytest.fixture(scope="module")
def ray_cluster():
    """A head node and a worker node of one CPU each; RAY_ADDRESS names the head while the module runs."""
    tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))   # short: Ray's socket paths live under it
    port = _free_port()
    nodes = [_start_node(["--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={tmp}"],
                         tmp / "head.log")]
    old = os.environ.get("RAY_ADDRESS")
    try:
        nodes.append(_start_node([f"--address=127.0.0.1:{port}"], tmp / "worker.log"))
        os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"
        yield
    finally:
        import ray
        ray.shutdown()
        for proc in reversed(nodes):
            _stop(proc)
        if old is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = old
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("tp_ray") / "qwen2", "qwen2", num_key_value_heads=2, seed=21)


def test_ray_tp2_equals_tp1_then_a_killed_actor_ends_the_engine(ray_cluster, model_dir):
    import ray
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
    reference = LLM(model_dir, **ENGINE).generate(PROMPTS, params, use_tqdm=False)
    llm = LLM(model_dir, tensor_parallel_size=2, distributed_executor_backend="ray", **ENGINE)
    try:
        executor = llm.engine.core.runner.executor
        nodes = ray.util.placement_group_table(executor.pg)["bundles_to_node_id"]
        assert nodes[0] == ray.get_runtime_context().get_node_id() != nodes[1]   # rank 1 on the other node
        outputs = llm.generate(PROMPTS, params, use_tqdm=False)
        for ref, out in zip(reference, outputs):
            assert out.outputs[0].token_ids == ref.outputs[0].token_ids
            for x, y in zip(ref.outputs[0].logprobs, out.outputs[0].logprobs):
                assert set(x) == set(y) and all(abs(x[k].logprob - y[k].logprob) <= 1e-5 for k in x)
        _kill_rank1_mid_run(llm.engine, ray, executor.actors[0])
    finally:
        llm.shutdown()


def _kill_rank1_mid_run(engine, ray, actor):
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"long{i}", prompt, SamplingParams(temperature=0, max_tokens=150, ignore_eos=True))
    for _ in range(4):
        engine.step()
    ray.kill(actor)
    start = time.monotonic()
    with pytest.raises(WorkerDiedError, match=r"rank 1 \(Ray actor\) died"):
        while engine.has_unfinished_requests():
            engine.step()
    assert time.monotonic() - start < 5


def test_cluster_too_small_is_a_value_error(ray_cluster, model_dir):
    with pytest.raises(ValueError, match=r"tensor_parallel_size \(4\) needs 4 CPUs .* the cluster has 2"):
        LLM(model_dir, tensor_parallel_size=4, distributed_executor_backend="ray", **ENGINE)
