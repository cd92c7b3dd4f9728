"""The Ray executor on 2 GPUs (NCCL, CUDA graphs on): a local Ray cluster of two nodes, one GPU each (the head
sees GPU 0, the worker node GPU 1, through CUDA_VISIBLE_DEVICES), so rank 0 runs on the GPU Ray reserved on the
engine's node and rank 1 in an actor on the other node's. TP=2 float32 greedy and seeded tokens equal TP=1's.
(A killed actor is tested on CPU: under NCCL the driver waits in the collective and the monitor exits the
process, which here would be pytest.) Skipped unless torch sees 2 GPUs and ray is installed.
Run: pytest -q tests/gpu/test_tensor_parallel_ray_cuda.py"""
import pytest
import torch

from conftest import make_tiny_model
from pagedllm import LLM, SamplingParams

pytest.importorskip("ray")
from ray_cluster import ray_cluster   # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]

PROMPTS = [[1] + [5 + (7 * i + j) % 400 for j in range(n)] for i, n in enumerate((0, 6, 40, 75, 130, 3, 250, 17))]


PARAMS = [SamplingParams(temperature=0, max_tokens=32, ignore_eos=True),
          SamplingParams(temperature=1.0, seed=5, max_tokens=32, ignore_eos=True)] * (len(PROMPTS) // 2)


def _tokens(llm) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]


def test_ray_tp2_on_two_gpu_nodes_equals_tp1(tmp_path):
    import ray
    d = make_tiny_model(tmp_path / "m", "qwen3", num_key_value_heads=2)
    engine = dict(device="cuda", dtype="float32", log_stats_interval=0, gpu_memory_utilization=0.4)
    llm = LLM(d, **engine)
    reference = _tokens(llm)
    del llm
    torch.cuda.empty_cache()
    nodes = [(["--num-cpus=2", "--num-gpus=1"], {"CUDA_VISIBLE_DEVICES": str(i)}) for i in range(2)]
    with ray_cluster(nodes):
        llm = LLM(d, tensor_parallel_size=2, distributed_executor_backend="ray", **engine)
        try:
            bundles = ray.util.placement_group_table(llm.engine.core.runner.executor.pg)["bundles_to_node_id"]
            assert bundles[0] != bundles[1]   # one rank a node
            assert llm.engine.core.runner.device == torch.device("cuda", 0)   # the GPU Ray gave the head
            assert _tokens(llm) == reference
        finally:
            llm.shutdown()
