"""Where a decode step's GPU time goes: torch.profiler over a few steps of W1 at full concurrency.

    python benchmarks/gpu_profile.py --model DIR --load-format dummy --max-model-len 4096 [--steps 10]

Adds all 256 W1 requests, steps until every prompt is prefilled (decode-only steps from then on), then
profiles --steps steps and prints the kernels by total GPU time, plus the wall time per step.
"""
import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from pagedllm import LLM, SamplingParams
from pagedllm.bench import workloads
from pagedllm.cli import add_engine_args, engine_kwargs


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=30)
    add_engine_args(parser)
    args = parser.parse_args()
    w = workloads.build("W1")
    llm = LLM(**engine_kwargs(args))
    engine = llm.engine
    for i, (p, n) in enumerate(zip(w.prompts, w.output_lens)):
        engine.add_request(str(i), p, SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=n))
    while engine.scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens
                                          for r in engine.scheduler.running):
        engine.step()
    for _ in range(5):
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / args.steps
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))
    gpu_us = sum(e.self_device_time_total for e in prof.key_averages()) / args.steps
    print(f"running {len(engine.scheduler.running)}; wall {wall * 1e3:.2f} ms/step (profiled); "
          f"GPU kernel time {gpu_us / 1e3:.2f} ms/step")


if __name__ == "__main__":
    main()
