"""FP8 KV cache end to end on tiny random float32 models (CPU): greedy runs, logprobs close to the float32-KV
engine, and prefix caching, chunked prefill and every preemption mode (recompute, swap, CPU + disk tiers) give
the fp8-KV run's own tokens: fp8 blocks round-trip through the tiers byte for byte."""
import numpy as np
import pytest
import torch
from conftest import make_tiny_model

from pagedllm import LLM, SamplingParams
from pagedllm.attention import torch_backend

BS = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=24)
# Teacher-forced logprob of each token, fp8 KV against float32 KV. These random models' next-token
# distributions are nearly flat (mean logprob -5.5 of 512 tokens), so greedy argmaxes are near ties; measured
# |error| max 0.83 / 0.46, mean 0.11 / 0.07 (llama / qwen3). Against float32 KV emulating the same fp8
# rounding: 1e-4 (float32 noise), which shows all of the difference is the KV's rounding.
LOGPROB_BOUND = (1.2, 0.2)     # max, mean
EMULATED_BOUND = 1e-4


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8_kv_models")
    return {"llama": make_tiny_model(root / "llama"), "qwen3": make_tiny_model(root / "qwen3", arch="qwen3", seed=3)}


def prompts_of(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 512, size=n).tolist() for n in lengths]


def engine(model_dir, **kw):
    return LLM(model_dir, dtype="float32", log_stats_interval=0, block_size=BS, **kw)


def tokens(llm: LLM, prompts, params=GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def prompt_logprobs(llm: LLM, prompts) -> list[np.ndarray]:
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [np.array([d[t].logprob for d, t in zip(o.prompt_logprobs[1:], p[1:])]) for o, p in zip(outs, prompts)]


def emulate_fp8_kv(monkeypatch):
    """float32 KV caches that hold K/V rounded as an fp8 cache rounds them (scale 1.0)."""
    write = torch_backend.write_kv

    def rounded(kv_cache, k, v, slot_mapping, k_scale=1.0, v_scale=1.0):
        qdq = [(x / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s for x, s in ((k, k_scale), (v, v_scale))]
        write(kv_cache, *qdq, slot_mapping)
    monkeypatch.setattr(torch_backend, "write_kv", rounded)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_fp8_kv_logprobs_close_to_float32_kv(model_dirs, arch, monkeypatch):
    d = model_dirs[arch]
    fp8 = engine(d, kv_cache_dtype="fp8")
    assert fp8.engine.runner.kv_caches[0].dtype == torch.float8_e4m3fn
    prompts = prompts_of([40, 75, 9])
    outs = tokens(fp8, prompts)
    assert all(len(o) == GREEDY.max_tokens for o in outs)
    # Teacher-forced over the prompt and the fp8 run's own continuation: the same tokens for both engines.
    seqs = [p + o for p, o in zip(prompts, outs)]
    ref = prompt_logprobs(engine(d), seqs)
    got = prompt_logprobs(fp8, seqs)
    err = np.abs(np.concatenate(got) - np.concatenate(ref))
    assert err.max() <= LOGPROB_BOUND[0] and err.mean() <= LOGPROB_BOUND[1], (err.max(), err.mean())
    emulate_fp8_kv(monkeypatch)
    emulated = np.concatenate(prompt_logprobs(engine(d), seqs))
    assert np.abs(np.concatenate(got) - emulated).max() <= EMULATED_BOUND


def test_fp8_kv_block_count_doubles(model_dirs):
    kw = {"kv_cache_memory": 1 << 20}
    assert engine(model_dirs["llama"], kv_cache_dtype="fp8", **kw).engine.runner.num_blocks == \
        4 * engine(model_dirs["llama"], **kw).engine.runner.num_blocks   # float32 model: 4 bytes -> 1


def test_prefix_cache_and_chunked_prefill_match_plain_fp8(model_dirs):
    d = model_dirs["llama"]
    prefix = prompts_of([48], seed=1)[0]
    prompts = [prefix + s for s in prompts_of([5, 11, 3], seed=2)] + prompts_of([70], seed=3)
    plain = [tokens(engine(d, kv_cache_dtype="fp8", enable_prefix_caching=False), [p])[0] for p in prompts]
    cached = engine(d, kv_cache_dtype="fp8")
    assert [tokens(cached, [p])[0] for p in prompts] == plain          # one by one: later ones hit the prefix
    assert cached.engine.get_stats().num_prompt_tokens < sum(map(len, prompts))
    chunked = engine(d, kv_cache_dtype="fp8", max_num_batched_tokens=16, enable_prefix_caching=False)
    assert tokens(chunked, prompts) == plain


@pytest.mark.parametrize("mode", ["recompute", "swap", "offload"])
def test_preemption_modes_match_plain_fp8(model_dirs, tmp_path, mode):
    d = model_dirs["llama"]
    prompts = prompts_of([30, 45, 20, 60, 33, 50])
    plain = tokens(engine(d, kv_cache_dtype="fp8", enable_prefix_caching=False), prompts)
    block_bytes = 2 * 2 * BS * 2 * 16         # layers x K,V x block_size x kv_heads x head_dim x 1 byte
    kw = {"kv_cache_dtype": "fp8", "num_gpu_blocks_override": 14, "enable_prefix_caching": False,
          "preemption_mode": mode}
    if mode == "swap":
        kw.update(swap_space=64 * block_bytes / 2**30)
    if mode == "offload":
        kw.update(kv_offloading_size=4 * block_bytes / 2**30, kv_disk_dir=str(tmp_path))
    llm = engine(d, **kw)
    assert tokens(llm, prompts) == plain
    assert llm.engine.scheduler.num_preemptions > 0
    if mode != "recompute":
        tiers = llm.engine.get_stats().kv_tiers
        assert sum(t.hits for t in tiers.values()) > 0
        assert llm.engine.runner.kv_offload.pool.dtype == torch.float8_e4m3fn
