"""Each architecture of the tiny-model fixture (ARCHS) on CUDA: float32 greedy tokens equal the CPU path's, with
CUDA graphs, chunked prefill beside decode rows, and batch-1 decode (the small-M kernels). The CPU path is the one
tested against transformers (tests/e2e/test_vs_transformers.py), so this holds each model's CUDA kernels to it."""
import gc

import pytest
import torch

from pagedllm import LLM, SamplingParams

pytestmark = pytest.mark.gpu

PROMPTS = [[5 + (7 * i + j) % 400 for j in range(n)] for i, n in enumerate((1, 7, 33, 90, 130, 3))]
# gemma2: sliding windows and soft caps in the kernels; gemma3: its (1 + weight) q/k norms in the fused kernels
ARCHS = ["llama", "llama_tied", "qwen2", "qwen3", "llama3_rope", "phi3", "phi3_longrope", "phi4_mini", "qwen3_moe",
         "mixtral", "granite", "olmo2", "gemma", "gemma2", "gemma3"]


def _tokens(d: str, prompts, **kwargs) -> list[list[int]]:
    # max_model_len past longrope's original 64 positions (the default there, too short for the 130-token prompt)
    llm = LLM(d, log_stats_interval=0, max_model_len=256, **kwargs)
    try:
        params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        del llm
        gc.collect()
        torch.cuda.empty_cache()


@pytest.mark.parametrize("arch", ARCHS)
def test_float32_greedy_on_cuda_matches_cpu(tiny_model_dirs, arch):
    d = tiny_model_dirs[arch]
    cpu = _tokens(d, PROMPTS, device="cpu")
    assert _tokens(d, PROMPTS, device="cuda", dtype="float32", max_num_batched_tokens=48) == cpu
    assert _tokens(d, PROMPTS[3:4], device="cuda", dtype="float32") == cpu[3:4]   # batch 1: small-M decode
