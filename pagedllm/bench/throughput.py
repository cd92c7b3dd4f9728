"""`pagedllm bench throughput`: offline throughput on a workload of shared/benchmarks.md, one JSON line.

Throughput = tokens / wall time of one generate call over the workload, after one small warm-up request;
start-up (engine construction to ready) is reported apart. Sampling as benchmarks.md says: temperature
1.0, top_p 1.0, ignore_eos, max_tokens = the request's output length. `--engine hf` times transformers
`generate` in static batches on the same requests (bench/hf_baseline.py).
"""
import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoConfig

from pagedllm.bench import hf_baseline, throughput_args
from pagedllm.bench.workloads import build
from pagedllm.engine.engine import resolve_device, resolve_dtype
from pagedllm.llm import LLM
from pagedllm.sampling_params import SamplingParams
from pagedllm.models import served_config

WARMUP_PROMPT = list(range(1, 9))   # 8 tokens + 4 generated: less than a block, so nothing is prefix-cached
WARMUP_TOKENS = 4


def main(args: argparse.Namespace, engine_kwargs: dict) -> dict:
    throughput_args.check(args)
    prompts, output_lens = select_requests(args, engine_kwargs)
    run = _run_pagedllm if args.engine == "pagedllm" else _run_hf
    result = {"workload": args.workload or "random", "engine": args.engine,
              "model": Path(engine_kwargs["model"]).name, "n": args.n,
              **run(prompts, output_lens, args, engine_kwargs), "max_output_len_cap": args.max_output_len_cap}
    result.update(throughput_args.vllm_keys(result))
    throughput_args.print_vllm_lines(result)
    line = json.dumps(result)
    print(line, flush=True)
    if args.output_json:
        with open(args.output_json, "a") as f:
            f.write(line + "\n")
    return result


def select_requests(args: argparse.Namespace, engine_kwargs: dict) -> tuple[list[list[int]], list[int]]:
    w = build(args.workload) if args.workload else throughput_args.random_requests(args, engine_kwargs)
    n = len(w.prompts) if args.num_requests is None else args.num_requests
    _check(1 <= n <= len(w.prompts), "--num-requests", f"in [1, {len(w.prompts)}] for {w.name}", n)
    _check(args.hf_batch_size >= 1, "--hf-batch-size", ">= 1", args.hf_batch_size)
    cap = args.max_output_len_cap
    _check(cap is None or cap >= 1, "--max-output-len-cap", ">= 1", cap)
    output_lens = w.output_lens[:n] if cap is None else [min(k, cap) for k in w.output_lens[:n]]
    return w.prompts[:n], output_lens


def _check(ok: bool, name: str, limit: str, value):
    if not ok:
        raise ValueError(f"{name} must be {limit}, got {value!r}")


def _sampling(max_tokens: int, n: int = 1, detokenize: bool = True) -> SamplingParams:
    return SamplingParams(n=n, temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=max_tokens,
                          detokenize=detokenize)


def _run_pagedllm(prompts, output_lens, args, engine_kwargs) -> dict:
    start = time.perf_counter()
    llm = LLM(**engine_kwargs)
    startup = time.perf_counter() - start
    engine = llm.engine
    llm.generate([WARMUP_PROMPT], _sampling(WARMUP_TOKENS), use_tqdm=False)
    engine.reset_peak_stats()
    before = engine.get_stats()
    start = time.perf_counter()
    params = [_sampling(k, args.n, not args.disable_detokenize) for k in output_lens]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    stats = engine.get_stats()
    llm.shutdown()   # tensor-parallel workers
    num_out = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    if num_out != sum(output_lens) * args.n:
        raise RuntimeError(f"generated {num_out} tokens, the workload asks for {sum(output_lens) * args.n}")
    queries = stats.prefix_cache_queries - before.prefix_cache_queries
    hits = stats.prefix_cache_hits - before.prefix_cache_hits
    return {**_figures(prompts, output_lens, seconds, startup, engine.device, engine.dtype, args.n),
            "kv_blocks": stats.num_blocks_total, "preemptions": stats.num_preemptions - before.num_preemptions,
            "kv_waste_at_peak": round(stats.kv_waste_at_peak, 5), "peak_blocks": stats.peak_blocks,
            "peak_running": stats.peak_running, "enable_prefix_caching": engine.config.enable_prefix_caching,
            "quantization": engine.config.quantization, "kv_cache_dtype": engine.config.kv_cache_dtype,
            "tensor_parallel_size": engine.config.tensor_parallel_size,
            "distributed_executor_backend": engine.config.distributed_executor_backend,
            "prefix_cache_hit_rate": round(hits / queries, 4) if queries else 0.0}


def _run_hf(prompts, output_lens, args, engine_kwargs) -> dict:
    hf_config = served_config(AutoConfig.from_pretrained(engine_kwargs["model"]))
    max_id = max(max(p) for p in prompts)
    _check(hf_config.vocab_size > max_id, "the model's vocab_size", f"> {max_id} (the workload's largest token "
           f"id)", hf_config.vocab_size)
    device = resolve_device(engine_kwargs["device"])
    dtype = resolve_dtype(engine_kwargs["dtype"], hf_config, device)
    torch.manual_seed(engine_kwargs["seed"])
    start = time.perf_counter()
    model = hf_baseline.load_random_model(hf_config, dtype, device)
    startup = time.perf_counter() - start
    hf_baseline.generate_batch(model, [WARMUP_PROMPT], WARMUP_TOKENS)
    seconds = hf_baseline.run_static_batches(model, prompts, output_lens, args.hf_batch_size)
    return {**_figures(prompts, output_lens, seconds, startup, device, dtype),
            "kv_blocks": None, "preemptions": None, "kv_waste_at_peak": None, "peak_blocks": None,
            "peak_running": None, "enable_prefix_caching": None, "prefix_cache_hit_rate": None,
            "counted": "requested", "hf_batch_size": args.hf_batch_size}


def _figures(prompts, output_lens, seconds, startup, device: torch.device, dtype: torch.dtype, n: int = 1) -> dict:
    num_in, num_out = sum(map(len, prompts)), sum(output_lens) * n   # every one of a prompt's n outputs counts
    return {"num_requests": len(prompts), "num_input_tokens": num_in, "num_output_tokens": num_out,
            "output_tok_s": round(num_out / seconds, 1), "total_tok_s": round((num_in + num_out) / seconds, 1),
            "requests_s": round(len(prompts) / seconds, 3), "seconds": round(seconds, 3),
            "elapsed_time": seconds, "startup_s": round(startup, 2), "device": _device_name(device),
            "dtype": str(dtype).removeprefix("torch.")}


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
