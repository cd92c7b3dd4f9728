"""A returning conversation (issue 17, part 4): time to first token with the CPU tier against recompute.

Turn 1 is a --history-token prompt (random ids) with a --answer-token greedy answer. Other traffic (prompts of
--other-len tokens, enough to fill the GPU KV cache once over) then evicts every block of it from the GPU cache,
which holds only one conversation (--gpu-blocks). The returning turn is history + answer + --new tokens: with the
CPU tier its blocks come back from pinned host memory (chained hashes over turn 1's prompt and output), without
it they are recomputed. One JSON line per returning turn, then a summary line:

    python benchmarks/returning_conversation.py --model .device/models/meta-llama--Llama-3.1-8B-Instruct

The tier engine then runs one more conversation (other seeds) for each --ab setting of runner/kv_offload
(COPY_CHUNK_BLOCKS=16: the old chunk), to compare in the same process. Weights are dummy; max_num_seqs 16
(one request at a time: fewer graphs to capture).
Figures: load GB/s = bytes of KV loaded / copy-stream time of the loads (pinned host -> GPU scratch -> blocks).
The returning step also stores the blocks it evicts (other traffic's) to the CPU tier before its loads, on
the same copy stream: stored_blocks and store_s show that part.
"""
import argparse
import gc
import json
import time

import numpy as np
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.cli import add_engine_args, engine_kwargs
from pagedllm.runner import kv_offload


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--history", type=int, default=30000, help="tokens of turn 1's prompt")
    parser.add_argument("--answer", type=int, default=64, help="tokens of turn 1's answer")
    parser.add_argument("--new", type=int, default=100, help="tokens of the new user message")
    parser.add_argument("--output", type=int, default=16, help="tokens of the returning turn's answer")
    parser.add_argument("--other-len", type=int, default=12000, help="tokens of each other-traffic prompt")
    parser.add_argument("--gpu-blocks", type=int, default=None,
                        help="GPU KV blocks (default: one returning conversation + 1/16)")
    parser.add_argument("--cpu-tier-gb", type=float, default=8.0, help="kv_offloading_size of the tier run")
    parser.add_argument("--modes", default="cpu,recompute")
    parser.add_argument("--ab", default="COPY_CHUNK_BLOCKS=16",
                        help="kv_offload settings, each for one more tier conversation ('': none)")
    add_engine_args(parser)
    parser.set_defaults(load_format="dummy", max_model_len=32768, max_num_seqs=16)
    args = parser.parse_args()
    total = args.history + args.answer + args.new + args.output
    gpu_blocks = args.gpu_blocks or -(-total // args.block_size) * 17 // 16
    num_others = gpu_blocks * args.block_size // args.other_len + 1     # their blocks pass the cache's
    base = {**engine_kwargs(args), "num_gpu_blocks_override": gpu_blocks}
    results, pool_info = {}, None
    for mode in args.modes.split(","):
        tier_gb = args.cpu_tier_gb if mode == "cpu" else None
        start = time.perf_counter()
        llm = LLM(**{**base, "kv_offloading_size": tier_gb})
        startup = time.perf_counter() - start
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4), use_tqdm=False)   # warm-up
        pool = llm.engine.runner.kv_offload.pool if mode == "cpu" else None
        settings = [""] + ([a for a in args.ab.split(",") if a] if mode == "cpu" else [])
        for k, setting in enumerate(settings):
            defaults = {name: getattr(kv_offload, name) for name in ("COPY_CHUNK_BLOCKS",)}
            if setting:
                name, value = setting.split("=")
                setattr(kv_offload, name, type(defaults[name])(int(value)))
            r = {"mode": mode, "ab": setting or None, **converse(llm, args, seed=10 * k, num_others=num_others),
                 "startup_s": round(startup, 1)}
            for name, value in defaults.items():
                setattr(kv_offload, name, value)
            print(json.dumps({key: v for key, v in r.items() if key not in ("output_head", "turn_s", "load_gb")}),
                  flush=True)
            results[(mode, k)] = r
        if pool is not None:
            pool_info = {"pinned": pool.is_pinned(), "gib": round(pool.numel() * pool.element_size() / 2**30, 2)}
        del llm, pool
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    summarize(results, args, gpu_blocks, pool_info)


def token_ids(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(1000, 100000, size=n).tolist()


def converse(llm: LLM, args, seed: int, num_others: int) -> dict:
    """Turn 1, other traffic, the returning turn; what the returning turn took."""
    greedy = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=args.answer)
    history = token_ids(args.history, seed)
    turn1 = llm.generate([history], greedy, use_tqdm=False)[0]
    for i in range(num_others):
        llm.generate([token_ids(args.other_len, seed + 1 + i)], SamplingParams(max_tokens=1), use_tqdm=False)
    prompt = history + list(turn1.outputs[0].token_ids) + token_ids(args.new, seed + 100)
    engine = llm.engine
    engine.step()          # an empty step reads back the copy-stream timings of the steps before
    before, gpu_hits = engine.get_stats(), engine.scheduler.kv.prefix_stats.hits
    start = time.perf_counter()
    out = llm.generate([prompt], SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=args.output),
                       use_tqdm=False)[0]
    seconds = time.perf_counter() - start
    engine.step()
    after = engine.get_stats()
    r = {"ttft_s": round(out.metrics.time_to_first_token, 4), "turn_s": round(seconds, 3),
         "turn1_ttft_s": round(turn1.metrics.time_to_first_token, 4),
         "gpu_hit_tokens": engine.scheduler.kv.prefix_stats.hits - gpu_hits,
         "output_head": list(out.outputs[0].token_ids[:4])}
    if "cpu" in after.kv_tiers:
        b, a = before.kv_tiers["cpu"], after.kv_tiers["cpu"]
        block_bytes = engine.scheduler.offload.block_bytes
        loaded, load_s = a.bytes_loaded - b.bytes_loaded, a.load_seconds - b.load_seconds
        r.update(tier_hit_blocks=a.hits - b.hits, load_gb=round(loaded / 1e9, 3), load_s=round(load_s, 4),
                 load_gb_s=round(loaded / load_s / 1e9, 1) if load_s else None,
                 stored_blocks=(a.bytes_stored - b.bytes_stored) // block_bytes,
                 store_s=round(a.store_seconds - b.store_seconds, 4))
    return r


def summarize(results: dict, args, gpu_blocks: int, pool_info: dict | None):
    tier, rec = results.get(("cpu", 0)), results.get(("recompute", 0))
    line = {"metric": "returning_conversation", "device": torch.cuda.get_device_name()
            if torch.cuda.is_available() else "cpu", "prompt_tokens": args.history + args.answer + args.new,
            "gpu_blocks": gpu_blocks, "history_blocks": (args.history + args.answer - 1) // args.block_size}
    if tier and rec:
        line.update(ttft_cpu_tier_s=tier["ttft_s"], ttft_recompute_s=rec["ttft_s"],
                    speedup=round(rec["ttft_s"] / tier["ttft_s"], 2), target_speedup=5,
                    same_first_tokens=tier["output_head"] == rec["output_head"])
    if tier:
        line.update(tier_hit_blocks=tier["tier_hit_blocks"], load_gb_s=tier["load_gb_s"], target_load_gb_s=20,
                    cpu_pool=pool_info)
    ab = [r for (mode, k), r in results.items() if mode == "cpu" and k > 0]
    if ab:
        line["ab"] = {r["ab"]: [r["ttft_s"], r["load_gb_s"]] for r in ab}   # ttft_s, load_gb_s
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
