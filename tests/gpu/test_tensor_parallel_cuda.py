"""Tensor parallelism on 2 GPUs (NCCL, CUDA graphs on): TP=2 float32 greedy tokens equal TP=1's on tiny Qwen3 /
Llama checkpoints (1 and 2 KV heads, tied and untied) and mixture-of-experts ones (Qwen3-MoE, Mixtral), and bf16
TP=2 with dummy weights starts and runs; FP8 at TP=2 (float32: the CPU TP=2 run's logprobs; bf16 on _scaled_mm:
starts and runs); the KV tiers at TP=2 (swap and offload preemption, the CPU tier: pinned pools and each rank's
copy stream) give TP=1's tokens and counts; speculative decoding at TP=2 (n-gram, a draft model) gives TP=1's
tokens with the same speculation.
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


def with_engine(d: str, use, device: str = "cuda", **kw):
    """use(llm)'s result, from an engine built for it (on CUDA 0.4 of each GPU, so a TP=2 and a TP=1 engine never
    compete), shut down and its memory freed before the next one starts."""
    llm = LLM(d, device=device, log_stats_interval=0, **({"gpu_memory_utilization": 0.4} if device == "cuda" else {}),
              **kw)
    try:
        return use(llm)
    finally:
        llm.shutdown()
        del llm
        gc.collect()
        torch.cuda.empty_cache()


def _tokens(llm: LLM) -> list[list[int]]:
    """PROMPTS' tokens, greedy and seeded sampled rows in turn."""
    params = [SamplingParams(temperature=0, max_tokens=32, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=5, max_tokens=32, ignore_eos=True)] * (len(PROMPTS) // 2)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]


def _run(d: str, **kw) -> list[list[int]]:
    return with_engine(d, _tokens, **kw)


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


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_tp2_moe_on_cuda(tmp_path, arch):
    """Mixture of experts at TP=2 over NCCL: float32 (the experts' loop, eager) gives TP=1's greedy tokens; bf16
    dummy weights (the grouped GEMMs over each rank's I/N, the MoE all-reduce inside CUDA graphs) start and run."""
    d = make_tiny_model(tmp_path / "m", arch)
    assert _run(d, tensor_parallel_size=2, dtype="float32") == _run(d, dtype="float32")
    out = _run(d, tensor_parallel_size=2, dtype="bfloat16", load_format="dummy")
    assert all(len(t) == 32 for t in out)


def _prompt_logprobs(d: str, device: str, **kw) -> list[list[dict]]:
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2)
    return with_engine(d, lambda llm: [o.prompt_logprobs[1:] for o in llm.generate(PROMPTS[:4], params,
                                                                                  use_tqdm=False)], device, **kw)


def test_tp2_fp8_float32_matches_cpu_tp2(tmp_path):
    """--quantization fp8 at TP=2 over NCCL (float32: the emulated fp8 GEMM, the same per-rank quantization as on
    CPU, tests/e2e/test_tensor_parallel_fp8.py) gives the CPU TP=2 run's prompt logprobs."""
    d = make_tiny_model(tmp_path / "m", "qwen3", num_key_value_heads=2, seed=3)
    kw = dict(dtype="float32", quantization="fp8", tensor_parallel_size=2)
    for cuda, cpu in zip(_prompt_logprobs(d, "cuda", **kw), _prompt_logprobs(d, "cpu", **kw), strict=True):
        for a, b in zip(cuda, cpu, strict=True):
            assert all(abs(a[t].logprob - b[t].logprob) < 1e-3 for t in set(a) & set(b))


@pytest.mark.parametrize("kind", ["ct_channel_dynamic", "fp8_block", None])
def test_tp2_fp8_bf16_runs_on_scaled_mm(tmp_path, kind):
    """bf16 (sizes multiples of 16: _scaled_mm and the Triton GEMM, the fused norm/activation quant, CUDA graphs):
    --quantization fp8 and pre-quantized checkpoints at TP=2 start and run (tokens are not TP=1 fp8's: each rank
    quantizes its own slices; the float32 test above checks the arithmetic)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parents[1] / "e2e"))
    from fp8_checkpoints import write_quantized
    d = make_tiny_model(tmp_path / "m", "qwen3", num_key_value_heads=2, seed=3)
    ckpt = d if kind is None else write_quantized(d, tmp_path / kind, kind)
    kw = dict(dtype="bfloat16", quantization="fp8" if kind is None else None)
    out = _run(ckpt, tensor_parallel_size=2, **kw)
    assert all(len(t) == 32 and all(0 <= i < 512 for i in t) for t in out)


@pytest.mark.parametrize("tiers", [dict(preemption_mode="swap", swap_space=0.01),
                                   dict(preemption_mode="offload", kv_offloading_size=0.01),
                                   dict(kv_offloading_size=0.01)])
def test_tp2_kv_tiers_on_cuda(tmp_path, tiers):
    """A 24-block KV cache preempts (swap; offload, through the disk tier) or evicts cached prompts into the CPU
    tier (prefix caching on, the prompts run twice: the second pass loads them back). Each rank copies its own
    heads' share on its own copy stream: float32 greedy tokens and the tiers' counts equal TP=1's."""
    d = make_tiny_model(tmp_path / "m", "qwen3", num_key_value_heads=2)
    kw = dict(dtype="float32", num_gpu_blocks_override=24, **tiers,
              enable_prefix_caching="preemption_mode" not in tiers)

    def use(llm: LLM):
        greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
        out = [[o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy, use_tqdm=False)] for _ in range(2)]
        return out, {name: (s.hits, s.misses, s.bytes_stored, s.bytes_loaded)
                     for name, s in llm.engine.get_stats().kv_tiers.items()}

    def run(tp: int):
        disk = {"kv_disk_dir": str(tmp_path / f"disk{tp}")} if tiers.get("preemption_mode") == "offload" else {}
        return with_engine(d, use, tensor_parallel_size=tp, **kw, **disk)

    tp1, tp2 = run(1), run(2)
    assert tp2 == tp1
    assert sum(hits for hits, *_ in tp1[1].values()) > 0


def _run_spec(d: str, **kw):
    """_run's tokens, and the speculative decoding counters."""
    return with_engine(d, lambda llm: (_tokens(llm), llm.engine.get_stats().spec_decode), **kw)


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_tp2_speculative_decoding_equals_tp1_on_cuda(tmp_path, method):
    """Speculative decoding at TP=2 over NCCL with CUDA graphs: the verify steps' graphs, and with a draft model its
    decode graphs and its pre-pass behind the verify (on CUDA whenever every row speculated the full k), on each
    rank. TP=1 with the same speculation gives the same tokens and accepts the same proposals (the model is its own
    draft: its greedy rows accept every one)."""
    d = make_tiny_model(tmp_path / "m", "qwen3", num_key_value_heads=1, vocab_size=510, seed=13)
    spec = ({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
            if method == "ngram" else {"method": "draft_model", "model": d, "num_speculative_tokens": 3})
    tp2, tp2_stats = _run_spec(d, dtype="float32", tensor_parallel_size=2, speculative_config=spec)
    tp1, tp1_stats = _run_spec(d, dtype="float32", speculative_config=spec)
    assert tp2 == tp1
    assert tp2_stats == tp1_stats and tp2_stats.num_accepted_tokens > 0
