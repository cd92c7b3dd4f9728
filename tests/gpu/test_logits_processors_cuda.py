"""Logits processors on CUDA: the same floats as on CPU, no device sync while building or applying them
(torch's sync debug mode raises on one), and the engine's penalised / bad-words greedy tokens equal the CPU's."""
import gc

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.sample.logits_processors import apply_logits_processors, build_logits_processors
from pagedllm.sample.penalties import Penalties, PenaltyTable

pytestmark = pytest.mark.gpu
V = 1000


def run(device: str, logits: torch.Tensor):
    params = [SamplingParams(repetition_penalty=1.4, presence_penalty=0.3, frequency_penalty=0.2,
                             logit_bias={5: 3.0}, bad_words=["x"]),
              SamplingParams(),
              SamplingParams(allowed_token_ids=list(range(0, V, 7)), repetition_penalty=0.9, bad_words=["y"])]
    params[0].bad_words_token_ids = [[11], [3, 4, 9]]
    params[2].bad_words_token_ids = [[8, 8]]
    in_flight_ids = torch.tensor([4, 8], device=device)
    record_slots = torch.tensor([0, 1], device=device)   # the test's own inputs: made before the sync check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        table = PenaltyTable(V, device)
        slots = [table.slot("a", [1, 2, 3], 3), None, table.slot("c", [7, 8], 2)]
        table.record(record_slots, in_flight_ids)
        procs = build_logits_processors(params, Penalties.build(table, params, slots, device),
                                        [([3], 0), None, ([], 1)], in_flight_ids, device)
        out = apply_logits_processors(logits.to(device, non_blocking=True), procs, [[], [2], []])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return out.cpu()


def test_processors_on_cuda_equal_cpu_without_a_sync():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0)) * 3
    cpu, cuda = run("cpu", logits), run("cuda", logits.pin_memory())
    assert torch.equal(cpu, cuda)
    assert torch.isinf(cuda[0, 9]) and torch.isinf(cuda[2, 8]) and torch.isinf(cuda[1, 2])


def test_engine_with_processors_on_cuda_matches_cpu(tiny_model_dirs):
    gc.collect()
    torch.cuda.empty_cache()
    d = tiny_model_dirs["llama"]
    prompts = [[5 + i for i in range(n)] for n in (3, 17, 40)]
    params = [SamplingParams(temperature=0, max_tokens=24, repetition_penalty=1.5, bad_words=["the"]),
              SamplingParams(temperature=0, max_tokens=24),
              SamplingParams(temperature=0, max_tokens=24, presence_penalty=1.0, frequency_penalty=0.5,
                             logit_bias={"17": 5.0})]
    cpu = LLM(d, device="cpu", log_stats_interval=0).generate(prompts, params, use_tqdm=False)
    cuda = LLM(d, device="cuda", dtype="float32", log_stats_interval=0).generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in cpu] == [o.outputs[0].token_ids for o in cuda]
