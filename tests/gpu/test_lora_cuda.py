"""LoRA on CUDA (Triton kernels: fused, shrink/expand with PAGEDLLM_LORA_KERNEL=split, or wide; the default, auto,
takes fused for these tiny layers, whose slots' A rows outnumber a quarter of their own; CUDA graphs): three
adapters and the base in one call.
- float32, graphs: the greedy tokens of transformers + PEFT (tests/e2e/test_lora.py's references), logprobs
  within 1e-3, and the CPU engine's (the torch loop) too;
- graphs vs enforce_eager: identical greedy tokens, float32 and bf16, with prompts chunked beside decode rows
  (mixed graphs) and decode-only steps (decode graphs) both replayed;
- base rows of a LoRA engine (graphs) give exactly the tokens and logprobs of an engine without LoRA; steps
  with no adapter row replay the graphs without the LoRA kernels, the others those with them;
- a bf16 run completes with every block freed."""
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


def _run(setup, device, dtype, names=None, replays=None, enable_lora=None, **kw):
    base, loras, _ = setup
    names = names or lora_e2e.assignment(loras)
    args = dict(enable_lora=True, max_loras=3) if (any(names) if enable_lora is None else enable_lora) else {}
    llm = LLM(base, device=device, dtype=dtype, log_stats_interval=0, num_gpu_blocks_override=256, max_num_seqs=8,
              **args, **kw)
    if replays is not None:
        _count_replays(llm.engine.runner.graphs, replays)
    outs = llm.generate(lora_e2e.PROMPTS, lora_e2e.GREEDY, use_tqdm=False,
                        lora_request=[loras.get(n) if n else None for n in names])
    stats = llm.engine.get_stats()
    assert stats.num_blocks_free == stats.num_blocks_total
    assert (llm.engine.runner.graphs is None) == (device == "cpu" or kw.get("enforce_eager", False))
    return [(o.outputs[0].token_ids, [next(iter(p.values())).logprob for p in o.outputs[0].logprobs]) for o in outs]


def _count_replays(graphs, count):
    replay = graphs.replay

    def counted(num_tokens, mixed, shared=False, lora=False):
        count[mixed] = count.get(mixed, 0) + 1
        count[("lora", lora)] = count.get(("lora", lora), 0) + 1
        return replay(num_tokens, mixed, shared, lora)
    graphs.replay = counted


def test_lora_cuda_float32_equals_peft_and_cpu(setup):
    base, loras, refs = setup
    names = lora_e2e.assignment(loras)
    replays = {}
    cuda = _run(setup, "cuda", "float32", replays=replays)
    assert replays.get(False, 0) > 0 and replays.get(True, 0) > 0
    for i, ((ids, lps), name) in enumerate(zip(cuda, names)):
        want_ids, want_lps = refs[name][i]
        assert ids == want_ids, f"prompt {i} under {name}"
        np.testing.assert_allclose(lps, want_lps, atol=1e-3, rtol=0)
    for (ids_cpu, lp_cpu), (ids_gpu, lp_gpu) in zip(_run(setup, "cpu", "float32"), cuda):
        assert ids_gpu == ids_cpu
        np.testing.assert_allclose(lp_gpu, lp_cpu, atol=1e-3, rtol=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("max_num_batched_tokens", [None, 48])   # 48: prompts in chunks, beside decode rows
def test_lora_cuda_graphs_equal_eager(setup, dtype, max_num_batched_tokens):
    replays = {}
    graphed = _run(setup, "cuda", dtype, replays=replays, max_num_batched_tokens=max_num_batched_tokens)
    assert replays.get(False, 0) > 0 and replays.get(True, 0) > 0
    eager = _run(setup, "cuda", dtype, enforce_eager=True, max_num_batched_tokens=max_num_batched_tokens)
    assert [ids for ids, _ in graphed] == [ids for ids, _ in eager]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lora_cuda_base_rows_are_the_base_model(setup, dtype):
    """Base rows beside adapter rows, in graphs: tokens and logprobs bit-identical to an engine without LoRA
    (the kernels never write a base row; both engines run the same steps, so the base GEMMs see the same shapes)."""
    names = lora_e2e.assignment(setup[1])
    with_lora = _run(setup, "cuda", dtype)
    without = _run(setup, "cuda", dtype, names=[None] * len(names))
    for (got, want), name in zip(zip(with_lora, without), names):
        if name is None:
            assert got == want


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lora_cuda_base_only_steps_skip_the_lora_graphs(setup, dtype):
    """A LoRA engine serving base requests only replays the graphs without the LoRA kernels, with the tokens and
    logprobs of an engine without LoRA; with adapter rows it replays those with them."""
    base_only = [None] * len(lora_e2e.PROMPTS)
    replays = {}
    with_lora_engine = _run(setup, "cuda", dtype, names=base_only, replays=replays, enable_lora=True)
    assert replays.get(("lora", False), 0) > 0 and replays.get(("lora", True), 0) == 0
    assert with_lora_engine == _run(setup, "cuda", dtype, names=base_only)
    replays = {}
    _run(setup, "cuda", dtype, replays=replays)
    assert replays.get(("lora", True), 0) > 0


def test_lora_cuda_bf16_runs(setup):
    assert all(len(ids) == lora_e2e.MAX_NEW for ids, _ in _run(setup, "cuda", "bfloat16"))


def test_lora_cuda_wide_gemm(setup, monkeypatch):
    """PAGEDLLM_LORA_KERNEL=wide (auto's pick on real layers: every slot's A rows in the base GEMM, then the expand):
    float32 gives transformers + PEFT's greedy tokens, and bf16 graphs equal its eager steps."""
    from pagedllm.lora import layers
    monkeypatch.setattr(layers, "LORA_KERNEL", "wide")
    base, loras, refs = setup
    for i, ((ids, lps), name) in enumerate(zip(_run(setup, "cuda", "float32"), lora_e2e.assignment(loras))):
        assert ids == refs[name][i][0], f"prompt {i} under {name}"
        np.testing.assert_allclose(lps, refs[name][i][1], atol=1e-3, rtol=0)
    graphs = _run(setup, "cuda", "bfloat16", max_num_batched_tokens=48)
    eager = _run(setup, "cuda", "bfloat16", max_num_batched_tokens=48, enforce_eager=True)
    assert [ids for ids, _ in graphs] == [ids for ids, _ in eager]


@pytest.mark.parametrize("kernel", ["auto", "wide"])
def test_lora_cuda_lora_dtype_and_target_modules(setup, monkeypatch, kernel):
    """vLLM's lora_dtype (adapters in another dtype than the model's: the wide path steps aside, the kernels cast)
    and lora_target_modules (some linears wrapped): graphs equal eager steps, and float32 with bfloat16 adapters
    gives the CPU engine's tokens under the same settings."""
    from pagedllm.lora import layers
    monkeypatch.setattr(layers, "LORA_KERNEL", kernel)
    for dtype, kw in (("bfloat16", dict(lora_dtype="float32")), ("float32", dict(lora_dtype="bfloat16")),
                      ("bfloat16", dict(lora_target_modules=["o_proj", "q_proj"]))):
        graphs = _run(setup, "cuda", dtype, max_num_batched_tokens=48, **kw)
        eager = _run(setup, "cuda", dtype, max_num_batched_tokens=48, enforce_eager=True, **kw)
        assert [ids for ids, _ in graphs] == [ids for ids, _ in eager], (dtype, kw)
    cpu = _run(setup, "cpu", "float32", lora_dtype="bfloat16", lora_target_modules=["down_proj", "v_proj"])
    cuda = _run(setup, "cuda", "float32", lora_dtype="bfloat16", lora_target_modules=["down_proj", "v_proj"])
    assert sum(a[0] == b[0] for a, b in zip(cpu, cuda)) >= len(cpu) - 1   # bf16 adapters: a near tie may flip


def test_lora_cuda_largest_vllm_ranks(setup):
    """max_lora_rank 320 and 512 (vLLM's largest): the split kernels' rank loop over several tiles gives PEFT's
    greedy tokens (float32)."""
    base, loras, refs = setup
    for rank in (320, 512):
        for i, ((ids, _), name) in enumerate(zip(_run(setup, "cuda", "float32", max_lora_rank=rank),
                                                 lora_e2e.assignment(loras))):
            assert ids == refs[name][i][0], f"rank {rank}: prompt {i} under {name}"
