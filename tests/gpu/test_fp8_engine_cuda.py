"""--quantization fp8 through the engine on CUDA: CUDA-graph replay of the fp8 layers (tiny model: every
layer on _scaled_mm) gives eager's tokens; dummy fp8 weights of a real layer size load and run."""
import gc

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.layers.quantization.fp8_linear import Fp8Linear

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _free_gpu_memory():
    gc.collect()
    torch.cuda.empty_cache()


def _greedy(llm, prompts):
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_fp8_graphs_match_eager(tiny_model_dirs, name):
    prompts = [[5 + i for i in range(n)] for n in (1, 7, 33, 90)]
    # a share of the GPU each: an engine still alive (a failed test's traceback holds its frame) must not starve
    # the next one, as a `runner` local once did here (every later engine test on the H200 failed)
    kwargs = dict(device="cuda", dtype="bfloat16", quantization="fp8", log_stats_interval=0,
                  gpu_memory_utilization=0.2)
    graphs = LLM(tiny_model_dirs[name], **kwargs)
    assert graphs.engine.runner.graphs is not None
    assert isinstance(graphs.engine.runner.model.model.layers[0].mlp.gate_up_proj, Fp8Linear)
    ours = _greedy(graphs, prompts)
    del graphs
    gc.collect()
    assert ours == _greedy(LLM(tiny_model_dirs[name], enforce_eager=True, **kwargs), prompts)


def test_dummy_fp8_weights_run(tmp_path):
    """A one-layer model of Qwen3-0.6B's widths with dummy fp8 weights: loads, serves, finite logprobs."""
    from conftest import make_tiny_model
    d = make_tiny_model(tmp_path / "q", "qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=1,
                        num_attention_heads=16, num_key_value_heads=8, head_dim=128)
    llm = LLM(d, device="cuda", dtype="bfloat16", quantization="fp8", load_format="dummy", log_stats_interval=0,
              gpu_memory_utilization=0.2)
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, logprobs=1, ignore_eos=True), use_tqdm=False)
    assert all(torch.isfinite(torch.tensor(lp[t].logprob)) for lp, t in zip(out[0].outputs[0].logprobs,
                                                                              out[0].outputs[0].token_ids))
