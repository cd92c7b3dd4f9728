"""Tensor parallelism on 2 GPUs (NCCL, CUDA graphs on): TP=2 float32 greedy tokens equal TP=1's on tiny Qwen3 /
Llama checkpoints (1 and 2 KV heads, tied and untied), and bf16 TP=2 with dummy weights starts and runs.
Skipped unless torch sees 2 GPUs. Run: pytest -q tests/gpu/test_tensor_parallel_cuda.py"""
import gc

import pytest
import torch

from conftest import make_tiny_model
from pagedllm import LLM, SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]

PROMPTS = [[1] + [5 + (7 * i + j) % 400 for j in range(n)] for i, n in enumerate((0, 6, 40, 75, 130, 3, 250, 17))]


@pytest.fixture(autouse=True)
def _free_gpu_memory():
    gc.collect()
    torch.cuda.empty_cache()


def _run(d: str, **kw) -> list[list[int]]:
    params = [SamplingParams(temperature=0, max_tokens=32, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=5, max_tokens=32, ignore_eos=True)] * (len(PROMPTS) // 2)
    llm = LLM(d, device="cuda", log_stats_interval=0, gpu_memory_utilization=0.4, **kw)
    try:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    finally:
        llm.shutdown()
        del llm
        gc.collect()
        torch.cuda.empty_cache()


@pytest.mark.parametrize("arch,kv_heads,tied", [("qwen3", 2, False), ("llama", 1, True)])
@pytest.mark.parametrize("max_num_batched_tokens", [None, 48])   # 48: chunked prompts beside decode rows
def test_tp2_tokens_equal_tp1_on_cuda(tmp_path, arch, kv_heads, tied, max_num_batched_tokens):
    d = make_tiny_model(tmp_path / "m", arch, num_key_value_heads=kv_heads, tie_word_embeddings=tied)
    kw = dict(dtype="float32", max_num_batched_tokens=max_num_batched_tokens)
    assert _run(d, tensor_parallel_size=2, **kw) == _run(d, **kw)


def test_tp2_bf16_dummy_weights_start_and_run(tmp_path):
    d = make_tiny_model(tmp_path / "m", "qwen3", num_key_value_heads=2)
    out = _run(d, tensor_parallel_size=2, dtype="bfloat16", load_format="dummy")
    assert all(len(t) == 32 for t in out)
