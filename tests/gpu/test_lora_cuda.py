"""LoRA on CUDA (eager: an engine with enable_lora captures no CUDA graphs until the shrink/expand kernels land):
three adapters and the base in one call give the CPU engine's greedy tokens in float32 (logprobs within 1e-3),
and a bf16 run completes with every block freed."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from pagedllm import LLM

pytestmark = pytest.mark.gpu
_spec = importlib.util.spec_from_file_location("lora_e2e", Path(__file__).parents[1] / "e2e" / "test_lora.py")
lora_e2e = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lora_e2e)
setup = lora_e2e.setup   # the module fixture: base model, three adapters, transformers + PEFT references


def _run(setup, device, dtype):
    base, loras, _ = setup
    names = lora_e2e.assignment(loras)
    llm = LLM(base, device=device, dtype=dtype, log_stats_interval=0, enable_lora=True, max_loras=2,
              num_gpu_blocks_override=256, max_num_seqs=8)
    outs = llm.generate(lora_e2e.PROMPTS, lora_e2e.GREEDY, use_tqdm=False, lora_request=[loras.get(n) for n in names])
    stats = llm.engine.get_stats()
    assert stats.num_blocks_free == stats.num_blocks_total
    if device == "cuda":
        assert llm.engine.runner.graphs is None   # eager until the LoRA kernels
    return [(o.outputs[0].token_ids, [next(iter(p.values())).logprob for p in o.outputs[0].logprobs]) for o in outs]


def test_lora_cuda_float32_equals_cpu(setup):
    cpu, cuda = _run(setup, "cpu", "float32"), _run(setup, "cuda", "float32")
    for (ids_cpu, lp_cpu), (ids_gpu, lp_gpu) in zip(cpu, cuda):
        assert ids_gpu == ids_cpu
        np.testing.assert_allclose(lp_gpu, lp_cpu, atol=1e-3, rtol=0)


def test_lora_cuda_bf16_runs(setup):
    assert all(len(ids) == lora_e2e.MAX_NEW for ids, _ in _run(setup, "cuda", "bfloat16"))
