"""LoRA under tensor parallelism on 2 GPUs (NCCL, CUDA graphs, the Triton LoRA kernels on each rank's slices):
float32 TP=2 greedy tokens equal TP=1's with two adapters and the base in one batch, then an adapter added at run
time, under each kernel layout (fused; wide: a row-parallel layer's expand writes into the wide GEMM's output,
made contiguous for the all-reduce). tests/e2e/test_tensor_parallel_lora.py is the CPU (torch loop) version.
Skipped unless torch sees 2 GPUs. Run: pytest -q tests/gpu/test_tensor_parallel_lora_cuda.py"""
import importlib.util
from pathlib import Path

import pytest
import torch

from pagedllm.lora import layers
from test_tensor_parallel_cuda import with_engine

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]
_spec = importlib.util.spec_from_file_location("tp_lora_e2e",
                                               Path(__file__).parents[1] / "e2e" / "test_tensor_parallel_lora.py")
tp_lora = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tp_lora)
setup = tp_lora.setup   # the module fixture: a tiny llama (1 KV head, biases) and three adapters


def _run(base, loras, **kw) -> list[list[int]]:
    def use(llm):
        return [[o.outputs[0].token_ids for o in tp_lora._run(llm, loras, rows)]
                for rows in (tp_lora.MIXED, tp_lora.LATE)]
    return with_engine(base, use, dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=16, **kw)


@pytest.mark.parametrize("kernel", ["fused", "wide"])
def test_tp2_lora_tokens_equal_tp1_on_cuda(setup, monkeypatch, kernel):
    monkeypatch.setenv(layers.KERNEL_ENV, kernel)     # the workers read it at import
    monkeypatch.setattr(layers, "LORA_KERNEL", kernel)   # rank 0 (this process) when its layers are built
    base, loras = setup
    assert _run(base, loras, tensor_parallel_size=2) == _run(base, loras)
