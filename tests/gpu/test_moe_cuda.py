"""Mixture-of-experts layers on CUDA: the grouped-GEMM path (torch._grouped_mm, bf16, sm90/sm100) against the
per-expert loop and a float32 reference, inside a CUDA graph with new routing on replay, and MoE models
through the engine with graphs (bf16) and eager (float32, the loop: graphs switched off by the model)."""
import copy
import gc

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.layers.moe import Experts, SparseMoeBlock, route

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
GROUPED = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] in (9, 10)
PROMPTS = [[5 + (7 * i + j) % 400 for j in range(n)] for i, n in enumerate((1, 7, 33, 90, 130, 3))]


@pytest.fixture(autouse=True)
def _free_gpu_memory():
    gc.collect()
    torch.cuda.empty_cache()


def _block(dtype, num_experts=8, top_k=2, hidden=64, inter=32):
    torch.manual_seed(0)
    block = SparseMoeBlock(hidden, num_experts, top_k, inter, renormalize=True)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return block.to(CUDA, dtype)


@pytest.mark.skipif(not GROUPED, reason="torch._grouped_mm's CUTLASS path: sm90/sm100")
@pytest.mark.parametrize("num_tokens", [1, 3, 37, 300])   # 1 and 3 tokens: most experts get no rows
def test_grouped_path_matches_the_loop(num_tokens, monkeypatch):
    """Same routing for all three: the bf16 grouped GEMMs, the bf16 per-expert loop, the loop in float32."""
    block = _block(torch.bfloat16)
    x = torch.randn(num_tokens, 64, device=CUDA).to(torch.bfloat16)
    assert block.experts.uses_grouped_mm(x)
    with torch.no_grad():
        weights, ids = route(block.gate(x), block.top_k, block.renormalize)
        grouped = block.experts(x, weights, ids).float()
        exact = copy.deepcopy(block.experts).float()(x.float(), weights, ids)
        monkeypatch.setattr(Experts, "uses_grouped_mm", lambda self, x: False)
        looped = block.experts(x, weights, ids).float()
    for got in (grouped, looped):
        assert (got - exact).norm() < 2e-2 * exact.norm()
    assert (grouped - looped).norm() < 2e-2 * exact.norm()


@pytest.mark.skipif(not GROUPED, reason="torch._grouped_mm's CUTLASS path: sm90/sm100")
def test_grouped_path_replays_in_a_cuda_graph_with_new_routing():
    block = _block(torch.bfloat16)
    static = torch.randn(16, 64, device=CUDA).to(torch.bfloat16)
    with torch.no_grad():
        block(static)                              # warm up outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = block(static)
        for seed in range(3):                      # other tokens: other experts, other row counts per expert
            torch.manual_seed(seed + 1)
            static.copy_(torch.randn(16, 64, device=CUDA).to(torch.bfloat16))
            graph.replay()
            torch.testing.assert_close(out, block(static), rtol=0, atol=0)


@pytest.mark.skipif(not GROUPED, reason="torch._grouped_mm's CUTLASS path: sm90/sm100")
@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_bf16_engine_with_graphs_gives_eager_tokens(tiny_model_dirs, name):
    kwargs = dict(device="cuda", dtype="bfloat16", log_stats_interval=0, max_num_batched_tokens=48)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    eager = LLM(tiny_model_dirs[name], enforce_eager=True, **kwargs)
    want = [o.outputs[0].token_ids for o in eager.generate(PROMPTS, params, use_tqdm=False)]
    del eager
    graphed = LLM(tiny_model_dirs[name], **kwargs)
    assert graphed.engine.runner.graphs is not None
    assert [o.outputs[0].token_ids for o in graphed.generate(PROMPTS, params, use_tqdm=False)] == want


def test_float32_moe_runs_eager_on_cuda_and_matches_cpu(tiny_model_dirs, caplog):
    d = tiny_model_dirs["qwen3_moe"]
    params = SamplingParams(temperature=0, max_tokens=16)
    cpu = LLM(d, device="cpu", log_stats_interval=0).generate(PROMPTS, params, use_tqdm=False)
    cuda = LLM(d, device="cuda", dtype="float32", max_num_batched_tokens=32, log_stats_interval=0)
    assert cuda.engine.runner.graphs is None      # the loop reads counts on the host: no graph can hold it
    assert "CUDA graphs off" in caplog.text
    got = cuda.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in cpu]
