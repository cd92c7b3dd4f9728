"""EngineConfig's batch defaults follow vLLM's: larger batches on big GPUs, a smaller step budget when serving."""
import re

import pytest

from pagedllm.config import DEMO_MODEL, EngineConfig


@pytest.mark.parametrize("large_gpu, serving, expected", [
    (True, False, (512, 16384)),    # H100/H200, offline LLM
    (True, True, (512, 8192)),      # H100/H200, serving
    (False, False, (256, 8192)),     # CPU, A100, smaller GPUs
    (False, True, (256, 8192)),
])
def test_batch_defaults(large_gpu, serving, expected):
    config = EngineConfig().with_batch_defaults(large_gpu, serving)
    assert (config.max_num_seqs, config.max_num_batched_tokens) == expected


def test_explicit_batch_sizes_are_kept():
    config = EngineConfig(max_num_seqs=7, max_num_batched_tokens=99).with_batch_defaults(True, False)
    assert (config.max_num_seqs, config.max_num_batched_tokens) == (7, 99)


def test_bad_batch_sizes_name_the_field():
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        EngineConfig(max_num_batched_tokens=-1)


@pytest.mark.parametrize("kw, words", [
    (dict(max_num_seqs="x"), "max_num_seqs must be an integer or None, got 'x'"),
    (dict(block_size=16.0), "block_size must be an integer, got 16.0"),
    (dict(max_model_len=64.5), "max_model_len must be an integer or None"),
    (dict(seed=None), "seed must be an integer, got None"),
    (dict(model=5), "model must be a string, got 5"),
    (dict(tokenizer=5), "tokenizer must be a string or None"),
    (dict(enforce_eager="yes"), "enforce_eager must be True or False"),
    (dict(gpu_memory_utilization="x"), "gpu_memory_utilization must be a number"),
    (dict(max_num_seqs=True), "max_num_seqs must be an integer or None, got True"),
    (dict(speculative_config=5), "speculative_config must be a string or a dict or None"),
])
def test_python_callers_get_the_fields_type_named(kw, words):
    """LLM(...) passes its kwargs here with no argparse in between: a wrong type is a ValueError naming the
    field (a fuzz found TypeErrors from deep inside, a 46 s Hub lookup for tokenizer=5, 'yes' taken as True)."""
    with pytest.raises(ValueError, match=re.escape(words)):
        EngineConfig(**kw)


def test_sizes_intervals_and_the_disk_dir_are_checked(tmp_path):
    (tmp_path / "afile").write_text("x")
    for kw, words in ((dict(kv_offloading_size=float("inf")), "kv_offloading_size must be a finite number"),
                      (dict(swap_space=float("nan"), preemption_mode="swap"), "swap_space must be a finite number"),
                      (dict(log_stats_interval=-1.0), "log_stats_interval must be >= 0"),
                      (dict(kv_disk_dir=str(tmp_path / "afile"), kv_offloading_size=1.0), "kv_disk_dir must be a dir"),
                      (dict(kv_disk_dir="", kv_offloading_size=1.0), "kv_disk_dir must be a directory path or None")):
        with pytest.raises(ValueError, match=words):
            EngineConfig(**kw)
    for kw in (dict(kv_offloading_size=1e9), dict(swap_space=1e9, preemption_mode="swap")):
        with pytest.raises(ValueError, match=r"must be at most this machine's memory .* got 1000000000.0"):
            EngineConfig(**kw)
    assert EngineConfig(kv_disk_gb=1e9).kv_disk_gb == 1e9   # a disk size: no memory bound
    from pagedllm.config import host_memory_gib
    if host_memory_gib() is not None:   # swap_space is a rank's pool: TP=2's two on this host must fit together
        half = host_memory_gib() * 0.6
        assert EngineConfig(swap_space=half, preemption_mode="swap").swap_space == half
        with pytest.raises(ValueError, match=r"swap_space must be at most this machine's memory .* over 2 ranks"):
            EngineConfig(swap_space=half, preemption_mode="swap", tensor_parallel_size=2)


def test_vllms_cpu_offload_gb_is_weights_offload_and_is_refused_pointing_to_the_kv_tier():
    """vLLM's cpu_offload_gb keeps model weights in CPU memory; here it sized the KV cache's CPU tier, so a model
    too big for the GPU got a KV tier and then ran out of memory loading. 0 (vLLM's default) is taken."""
    from pagedllm import LLM
    with pytest.raises(ValueError, match=re.escape("cpu_offload_gb must be 0: offloading model weights to CPU "
                                                   "memory (vLLM's --cpu-offload-gb) is not built; a CPU tier of "
                                                   "the KV cache is kv_offloading_size")):
        LLM(DEMO_MODEL, device="cpu", cpu_offload_gb=20)
    config = EngineConfig(cpu_offload_gb=0)
    assert config.kv_offloading_size is None and not config.kv_tiers_enabled
    config = EngineConfig(kv_offloading_size=0.5)
    assert (config.kv_offloading_size, config.kv_offloading_backend, config.kv_tiers_enabled) == (0.5, "native", True)


def test_swap_space_sizes_the_swap_pool_of_swap_preemption_only():
    """vLLM 0.26 has no --swap-space (0.18 dropped it; V1 had ignored it) nor --preemption-mode: here they are V0's
    pair. A swap_space without swap preemption sized nothing and was taken silently; it is refused, naming why."""
    assert EngineConfig(preemption_mode="swap").swap_space == 4.0   # V0's default
    assert EngineConfig(preemption_mode="swap", swap_space=0.5).swap_space == 0.5
    assert EngineConfig().swap_space is None
    with pytest.raises(ValueError, match=re.escape("swap_space must be None (unset) unless preemption_mode is swap, "
                                                   "the only mode that uses it, got 16")):
        EngineConfig(swap_space=16)


def test_paths_numbers_and_json_dicts_are_taken():
    from pathlib import Path
    config = EngineConfig(model=Path(DEMO_MODEL), gpu_memory_utilization=1,
                          speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    assert config.model == DEMO_MODEL and config.speculative.num_speculative_tokens == 2


@pytest.mark.parametrize("dtype, ckpt, bf16_ok, expected", [
    ("half", "bfloat16", True, "float16"),        # vLLM's aliases: half = float16, float = float32
    ("float", "bfloat16", True, "float32"),
    ("auto", "float32", True, "bfloat16"),        # vLLM downcasts fp32 to the GPU's preferred dtype: bf16 ...
    ("auto", "float32", False, "float16"),        # ... where it has bf16 (compute capability 8.0+), else fp16
    ("auto", "bfloat16", True, "bfloat16"),
])
def test_dtype_as_vllm_resolves_it(monkeypatch, dtype, ckpt, bf16_ok, expected):
    import torch
    from transformers import LlamaConfig

    from pagedllm.engine.engine import resolve_dtype
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_ok)
    config = EngineConfig(dtype=dtype)   # accepted by the config (and so by --dtype)
    assert resolve_dtype(config.dtype, LlamaConfig(dtype=ckpt), torch.device("cuda")) == getattr(torch, expected)


@pytest.mark.parametrize("value, expected", [("1k", "(1000)"), ("1K", "(1024)"), ("2.5k", "(2500)"),
                                             ("600", "(600)")])
def test_max_model_len_takes_vllms_human_readable_ints(capsys, value, expected):
    """vLLM's --max-model-len 32k (k = 1000, K = 1024); the demo's 512 positions then refuse it, naming it."""
    from pagedllm.cli import main
    assert main(["generate", "--device", "cpu", "--max-model-len", value]) == 2
    assert f"max_model_len {expected} must be at most" in capsys.readouterr().err


def test_a_bad_human_readable_int_names_the_flag(capsys):
    from pagedllm.cli import main
    with pytest.raises(SystemExit):
        main(["generate", "--max-model-len", "1.5K"])
    assert "--max-model-len" in capsys.readouterr().err
