"""W3 (8 shared 2,000-token prefixes, 512 requests) with a GPU KV cache that holds only 2 prefixes' requests:
recompute only vs the CPU tier vs the disk tier of the prefix cache. One JSON line per run, then the CPU tier's
effective load bandwidth (GPU KV blocks filled per second of copy-stream time, pinned host -> GPU + scatter).

    python benchmarks/kv_tiers.py --model ../shared/model-configs/meta-llama--Llama-3.1-8B-Instruct \\
        [--modes recompute,cpu,disk] [--limit N] [--gpu-prefixes 2] [--cpu-tier-gb 4] [engine flags]

Weights are dummy. The disk run uses a fresh directory (--disk-dir, else a temporary one) and a CPU tier of
--disk-run-cpu-gb: disk hits are staged through the CPU tier, so it must hold at least one prefix (125 blocks).
Files just written are usually still in the page cache: the disk figure is an upper bound for a cold SSD.
"""
import argparse
import gc
import json
import tempfile
import time

import torch

from pagedllm import LLM, SamplingParams
from pagedllm.bench.workloads import build as build_workload
from pagedllm.cli import add_engine_args, engine_kwargs

PREFIX_LEN, SUFFIX_LEN, OUTPUT_LEN = 2000, 100, 64


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--modes", default="recompute,cpu,disk")
    parser.add_argument("--limit", type=int, default=None, help="only the first N requests")
    parser.add_argument("--gpu-prefixes", type=int, default=2,
                        help="KV blocks for this many whole requests (prefix + suffix + output)")
    parser.add_argument("--cpu-tier-gb", type=float, default=4.0, help="kv_offloading_size of the cpu run")
    parser.add_argument("--disk-run-cpu-gb", type=float, default=1.0,
                        help="kv_offloading_size of the disk run: ~4 prefixes, less than the 8 that cycle")
    parser.add_argument("--disk-dir", default=None, help="kv_disk_dir of the disk run (default: a temp dir)")
    add_engine_args(parser)
    args = parser.parse_args()
    w = build_workload("W3")
    prompts = w.prompts[:args.limit]
    params = [SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=n)
              for n in w.output_lens[:args.limit]]
    blocks_per_request = -(-(PREFIX_LEN + SUFFIX_LEN + OUTPUT_LEN) // args.block_size)
    base = {**engine_kwargs(args), "load_format": "dummy",
            "num_gpu_blocks_override": args.gpu_prefixes * blocks_per_request}
    cpu_load = None
    for mode in args.modes.split(","):
        with tempfile.TemporaryDirectory(dir=args.disk_dir) as disk_dir:
            result = run(mode, base, _tier_args(mode, args, disk_dir), prompts, params)
        print(json.dumps(result), flush=True)
        if mode == "cpu":
            cpu_load = result["tiers"].get("cpu")
    if cpu_load is not None:
        print(json.dumps({"metric": "cpu_tier_load_gb_s", "device": result["device"],
                          "gb_s": round(cpu_load["bytes_loaded"] / cpu_load["load_seconds"] / 1e9, 2)
                          if cpu_load["load_seconds"] else None,
                          "bytes_loaded": cpu_load["bytes_loaded"], "load_seconds": cpu_load["load_seconds"]}))


def _tier_args(mode: str, args, disk_dir: str) -> dict:
    if mode == "recompute":
        return {"kv_offloading_size": None, "kv_disk_dir": None}
    if mode == "cpu":
        return {"kv_offloading_size": args.cpu_tier_gb, "kv_disk_dir": None}
    if mode == "disk":
        return {"kv_offloading_size": args.disk_run_cpu_gb, "kv_disk_dir": disk_dir}
    raise ValueError(f"--modes: each must be recompute, cpu or disk, got {mode!r}")


def run(mode: str, base: dict, tier_args: dict, prompts, params) -> dict:
    start = time.perf_counter()
    llm = LLM(**{**base, **tier_args})
    startup = time.perf_counter() - start
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4), use_tqdm=False)   # warm-up
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    llm.engine.step()   # an empty step reads back the copy-stream timings of the last steps
    stats = llm.engine.get_stats()
    num_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    num_in = sum(len(p) for p in prompts)
    ttft = [o.metrics.time_to_first_token for o in outputs]
    result = {
        "workload": "W3", "mode": mode, "requests": len(prompts), "output_tok_s": round(num_out / seconds, 1),
        "total_tok_s": round((num_in + num_out) / seconds, 1), "mean_ttft_s": round(sum(ttft) / len(ttft), 3),
        "seconds": round(seconds, 2), "startup_s": round(startup, 2),
        "device": torch.cuda.get_device_name() if llm.engine.device.type == "cuda" else "cpu",
        "dtype": str(llm.engine.dtype), "kv_blocks": llm.engine.runner.num_blocks,
        "preemptions": stats.num_preemptions, "prefix_cache_hit_rate": round(stats.prefix_cache_hit_rate, 3),
        "prompt_tokens_computed": stats.num_prompt_tokens, **tier_args,
        "tiers": {name: vars(t) for name, t in stats.kv_tiers.items()}}
    del llm, outputs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


if __name__ == "__main__":
    main()
