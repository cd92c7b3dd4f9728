"""Structured output on CUDA: the bitmask applied by xgrammar's Triton kernel equals the CPU kernel's on fresh
random inputs (only the given rows, no device sync), and the engine's constrained outputs match their regex
with the plain greedy rows of the batch unchanged."""
import re

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.runner.model_runner import apply_bitmask

pytestmark = pytest.mark.gpu
REGEX = r"(cat|dog)-[0-9]{2,4}\.(red|blue)"


@pytest.mark.parametrize("vocab", [1000, 151936])
def test_bitmask_on_cuda_equals_cpu_without_a_sync(vocab):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(8, vocab, generator=g)
    words = (vocab + 31) // 32
    bitmask = torch.randint(-2**31, 2**31 - 1, (8, words), dtype=torch.int32, generator=g).pin_memory()
    rows = [0, 3, 6]
    expected = logits.clone()
    apply_bitmask(expected, bitmask, rows)
    on_device = logits.cuda()
    torch.cuda.synchronize()
    apply_bitmask(on_device, bitmask, [0, 3, 6])   # compile the kernel first (its launch may sync once)
    on_device = logits.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        apply_bitmask(on_device, bitmask, rows)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(on_device.cpu(), expected)
    assert torch.equal(expected[1], logits[1]) and torch.isinf(expected[0]).any()


def test_constrained_rows_on_cuda():
    llm = LLM(device="cuda", dtype="float32", num_gpu_blocks_override=256, log_stats_interval=0)
    prompts = ["Once upon a time", "The little dog was", "One day", "Lily and Tom"]
    plain = SamplingParams(temperature=0.0, max_tokens=20)
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=24, structured_outputs={"regex": REGEX})
              for i in range(4)] + [plain] * 2
    outs = llm.generate(prompts + prompts[:2], params, use_tqdm=False)
    for o in outs[:4]:
        assert o.outputs[0].finish_reason == "stop" and re.fullmatch(REGEX, o.outputs[0].text), o.outputs[0]
    alone = llm.generate(prompts[:2], plain, use_tqdm=False)
    assert [o.outputs[0].text for o in outs[4:]] == [o.outputs[0].text for o in alone]
    assert llm.engine.core.structured.stats.num_steps > 0
