"""The Ray executor on a local CPU Ray cluster this module starts as Ray's docs say (`ray start --head`, then
`ray start --address=...` for a second node; one CPU each, so rank 0's bundle fills the engine's node and rank 1
lands on the other): TP=2 gives TP=1's greedy tokens and logprobs (TP=1: the unsplit model, the independent
reference); a rank-1 actor whose process is killed ends the engine with WorkerDiedError within seconds; a
cluster too small is a ValueError naming tensor_parallel_size. The engine finds the cluster through RAY_ADDRESS
(ray.init("auto"))."""
import os
import signal
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

from conftest import assert_dies_within, final_token_ids, make_tiny_model   # noqa: E402
from pagedllm import LLM, SamplingParams   # noqa: E402
from pagedllm.distributed.executor import WorkerDiedError   # noqa: E402
from ray_cluster import ray_cluster   # noqa: E402

PROMPTS = [[1] + [5 + (7 * i + j) % 400 for j in range(n)] for i, n in enumerate((0, 6, 40, 75))]
ENGINE = dict(device="cpu", log_stats_interval=0, max_num_batched_tokens=32, max_model_len=256)
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)


@pytest.fixture(scope="module")
def cluster():
    """A head node and a worker node of one CPU each."""
    with ray_cluster([(["--num-cpus=1", "--num-gpus=0"], {})] * 2):
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("tp_ray") / "qwen2", "qwen2", num_key_value_heads=2, seed=21)


@pytest.fixture(scope="module")
def reference(model_dir):
    """TP=1: the unsplit model."""
    return LLM(model_dir, **ENGINE).generate(PROMPTS, GREEDY, use_tqdm=False)


def test_ray_tp2_equals_tp1_then_a_killed_actor_ends_the_engine(cluster, model_dir, reference):
    import ray
    llm = LLM(model_dir, tensor_parallel_size=2, distributed_executor_backend="ray", **ENGINE)
    try:
        executor = llm.engine.core.runner.executor
        nodes = ray.util.placement_group_table(executor.pg)["bundles_to_node_id"]
        assert nodes[0] == ray.get_runtime_context().get_node_id() != nodes[1]   # rank 1 on the other node
        outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
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
    pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
    for _ in range(4):
        engine.step()
    os.kill(pid, signal.SIGKILL)   # a crash: Ray learns of it from the node, not from ray.kill
    start = time.monotonic()
    with pytest.raises(WorkerDiedError, match=r"rank 1 \(Ray actor\) died"):
        while engine.has_unfinished_requests():
            engine.step()
    assert time.monotonic() - start < 5


def test_cluster_too_small_is_a_value_error(cluster, model_dir):
    with pytest.raises(ValueError, match=r"tensor_parallel_size \(4\) needs 4 CPUs .* the cluster has 2"):
        LLM(model_dir, tensor_parallel_size=4, distributed_executor_backend="ray", **ENGINE)


def test_async_llm_ray_tp2_and_a_killed_actor(cluster, model_dir, reference):
    """Through AsyncLLM (the server's engine: ray.init and the actors in the core process): TP=1's tokens; a
    killed actor ends the core process, and the request in flight fails with EngineDeadError within seconds."""
    import asyncio

    from pagedllm.config import EngineConfig
    from pagedllm.engine.async_llm import AsyncLLM

    async def main():
        engine = AsyncLLM(EngineConfig(model_dir, tensor_parallel_size=2, distributed_executor_backend="ray",
                                       **ENGINE))
        try:
            got = await asyncio.gather(*(final_token_ids(engine, f"r{i}", p, GREEDY) for i, p in enumerate(PROMPTS)))
            assert got == [o.outputs[0].token_ids for o in reference]
            pid = _actor_pid("ray::RankActor")   # the core process's rank-1 actor (Ray names its process so)
            await assert_dies_within(engine, PROMPTS[2], lambda: os.kill(pid, signal.SIGKILL))
        finally:
            engine.shutdown()

    asyncio.run(main())


def _actor_pid(title: str) -> int:
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(title.encode()):
                return int(proc.name)
        except OSError:
            continue
    raise AssertionError(f"no process {title!r}")
