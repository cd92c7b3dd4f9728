"""The benchmark workloads of shared/benchmarks.md, built exactly as specified (numpy default_rng), and vLLM's
"random" dataset shape (fixed or ranged input/output lengths of random token ids) for `bench serve`."""
from dataclasses import dataclass

import numpy as np

WORKLOADS = ("W1", "W2", "W3", "W4", "W4-prefill")


@dataclass
class Workload:
    name: str
    model_config: str            # folder name under shared/model-configs
    prompts: list[list[int]]
    output_lens: list[int]


def build(name: str) -> Workload:
    if name == "W1":
        return _random_lengths("W1", "Qwen--Qwen3-0.6B", 256, (100, 1024), (100, 1024))
    if name == "W2":
        return _random_lengths("W2", "meta-llama--Llama-3.1-8B-Instruct", 1000, (256, 2048), (64, 512))
    if name == "W3":
        rng = np.random.default_rng(0)
        prefixes = [rng.integers(0, 10000, size=2000).tolist() for _ in range(8)]
        prompts = [prefixes[i % 8] + rng.integers(0, 10000, size=100).tolist() for i in range(512)]
        return Workload("W3", "meta-llama--Llama-3.1-8B-Instruct", prompts, [64] * 512)
    if name in ("W4", "W4-prefill"):          # long context: run with max_model_len 32768
        rng = np.random.default_rng(1)
        prompts = [rng.integers(0, 10000, size=30000).tolist() for _ in range(32)]
        return Workload(name, "Qwen--Qwen3-0.6B", prompts, [256 if name == "W4" else 1] * 32)
    raise ValueError(f"workload must be one of {WORKLOADS}, got {name!r}")


def random_workload(num_prompts: int, input_len: int, output_len: int, range_ratio: float = 0.0,
                    seed: int = 0, vocab_size: int | None = None, prefix_len: int = 0) -> Workload:
    """vLLM's `--dataset-name random`: lengths uniform in [len * (1 - range_ratio), len * (1 + range_ratio)]
    (exactly len by default), token ids uniform in [0, 10000) as W1-W3's (sent as ids, not text), or below
    vocab_size where that is smaller (a small model's vocabulary: ids past it are refused). prefix_len
    (vLLM's --random-prefix-len): one run of random ids put before every prompt, on top of its length."""
    if not 0 <= range_ratio < 1:
        raise ValueError(f"random_range_ratio must be in [0, 1), got {range_ratio}")

    def bounds(n):
        return max(int(n * (1 - range_ratio)), 1), max(int(n * (1 + range_ratio)), 1)
    id_bound = min(10000, vocab_size or 10000)
    w = _random_lengths("random", "Qwen--Qwen3-0.6B", num_prompts, bounds(input_len), bounds(output_len), seed,
                        id_bound)
    if prefix_len > 0:   # a generator of its own: the prompts stay those of the same seed without a prefix
        prefix = np.random.default_rng([seed, 1]).integers(0, id_bound, size=prefix_len).tolist()
        w.prompts = [prefix + p for p in w.prompts]
    return w


def _random_lengths(name, model_config, n, in_range, out_range, seed: int = 0, id_bound: int = 10000) -> Workload:
    rng = np.random.default_rng(seed)
    input_lens = rng.integers(in_range[0], in_range[1] + 1, size=n)
    output_lens = rng.integers(out_range[0], out_range[1] + 1, size=n)
    prompts = [rng.integers(0, id_bound, size=int(k)).tolist() for k in input_lens]
    return Workload(name, model_config, prompts, [int(x) for x in output_lens])
