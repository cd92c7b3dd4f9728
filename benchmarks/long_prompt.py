"""A context to the model's limit (issue 17, part 2): one --prompt-len prompt (random ids, seeded), greedy,
--output tokens, with CUDA graphs and without (enforce_eager), one engine after the other, each in a process of
its own (spawned: the second finds the GPU as the first did; --same-process to run them here).
One JSON line per run (time to first token from the engine's metrics, decode time per token), then a summary
with the output token ids and whether both runs gave the same ones.

    python benchmarks/long_prompt.py --model .device/models/meta-llama--Llama-3.1-8B-Instruct

Weights are dummy; max_model_len defaults to 131072 (Llama-3.1's limit) and the KV cache to what
gpu_memory_utilization leaves after the profiled step, so the run also shows that the largest step fits.
"""
import argparse
import gc
import json
import multiprocessing
import time

import numpy as np
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.cli import add_engine_args, engine_kwargs


def prompt_ids(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(1000, 100000, size=n).tolist()


def run_prompt(engine_args: dict, prompt: list[int], max_tokens: int, logprobs: int | None = None) -> dict:
    """A fresh engine, a warm-up, then the prompt; frees the engine's GPU memory before returning. With logprobs,
    "top" holds each output position's top logprobs ([token id, logprob] pairs, best first)."""
    start = time.perf_counter()
    llm = LLM(**engine_args)
    startup = time.perf_counter() - start
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)   # warm-up
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=max_tokens, logprobs=logprobs)
    start = time.perf_counter()
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    seconds = time.perf_counter() - start
    ttft = out.metrics.time_to_first_token
    result = {"enforce_eager": engine_args.get("enforce_eager", False), "prompt_tokens": len(prompt),
              "ttft_s": round(ttft, 3), "seconds": round(seconds, 3),
              "decode_ms_per_token": round((seconds - ttft) / max(max_tokens - 1, 1) * 1e3, 2),
              "kv_blocks": llm.engine.runner.num_blocks, "startup_s": round(startup, 1),
              "output_ids": list(out.outputs[0].token_ids)}
    if logprobs:
        result["top"] = [sorted(([t, lp.logprob] for t, lp in pos.items()), key=lambda p: -p[1])[:logprobs]
                         for pos in out.outputs[0].logprobs]
    del llm, out
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt-len", type=int, default=120000)
    parser.add_argument("--output", type=int, default=32)
    parser.add_argument("--prompt-seed", type=int, default=0)
    parser.add_argument("--modes", default="graphs,eager", help="graphs: CUDA graphs on; eager: enforce_eager")
    parser.add_argument("--same-process", action="store_true", help="run the engines in this process")
    add_engine_args(parser)
    parser.set_defaults(load_format="dummy", max_model_len=131072, max_num_seqs=16)
    args = parser.parse_args()
    prompt = prompt_ids(args.prompt_len, args.prompt_seed)
    runs = []
    for mode in args.modes.split(","):
        if mode not in ("graphs", "eager"):
            raise SystemExit(f"--modes: graphs or eager, got {mode!r}")
        run_args = ({**engine_kwargs(args), "enforce_eager": mode == "eager"}, prompt, args.output)
        if args.same_process:
            r = run_prompt(*run_args)
        else:
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                r = pool.apply(run_prompt, run_args)
        print(json.dumps({k: v for k, v in r.items() if k not in ("output_ids", "seconds")}), flush=True)
        runs.append(r)
    ids = [r["output_ids"] for r in runs]
    print(json.dumps({"metric": "long_prompt", "device": torch.cuda.get_device_name() if torch.cuda.is_available()
                      else "cpu", "prompt_tokens": args.prompt_len, "ttft_s": [r["ttft_s"] for r in runs],
                      "identical": all(i == ids[0] for i in ids), "output_ids": ids[0],
                      **({} if all(i == ids[0] for i in ids) else {"other_ids": ids[1:]})}), flush=True)


if __name__ == "__main__":
    main()
