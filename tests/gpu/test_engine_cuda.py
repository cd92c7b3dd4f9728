"""The engine on CUDA with the torch attention backend: float32 greedy identical to transformers on CPU."""
import pytest
import torch

from pagedllm import LLM, SamplingParams

pytestmark = pytest.mark.gpu


def test_float32_greedy_on_cuda_matches_cpu(tiny_model_dirs):
    d = tiny_model_dirs["qwen3"]
    prompts = [[5 + i for i in range(n)] for n in (1, 7, 33, 90)]
    params = SamplingParams(temperature=0, max_tokens=16, logprobs=0)
    cpu = LLM(d, device="cpu", log_stats_interval=0).generate(prompts, params, use_tqdm=False)
    cuda = LLM(d, device="cuda", dtype="float32", max_num_batched_tokens=32,
               log_stats_interval=0).generate(prompts, params, use_tqdm=False)
    for a, b in zip(cpu, cuda):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids


def test_seeded_sampling_on_cuda_is_reproducible(tiny_model_dirs):
    d = tiny_model_dirs["llama"]
    llm = LLM(d, device="cuda", log_stats_interval=0)
    p = SamplingParams(temperature=1.0, seed=11, max_tokens=16, ignore_eos=True)
    a = llm.generate([[3, 4, 5]], p, use_tqdm=False)[0].outputs[0].token_ids
    b = llm.generate([[9, 9, 9], [3, 4, 5]], [SamplingParams(temperature=1.0), p], use_tqdm=False)[1]
    assert b.outputs[0].token_ids == a
    assert torch.cuda.is_available()
