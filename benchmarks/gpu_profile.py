"""Where a decode step's GPU time goes: torch.profiler over a few steps of a workload at full concurrency.

    python benchmarks/gpu_profile.py --model DIR --load-format dummy --max-model-len 4096 [--workload W3] [--steps 10]
    python benchmarks/gpu_profile.py --model DIR --load-format dummy --max-model-len 32768 --workload W4-prefill \
        --phase prefill

Adds all the workload's requests (W1 by default), steps until as many run as can and none is mid-prompt
(decode-only steps from then on), then profiles --steps steps and prints the kernels by total GPU time,
plus the wall time per step. --phase prefill profiles prefill steps instead (after 3 unprofiled ones).
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
    parser.add_argument("--workload", default="W1", choices=["W1", "W2", "W3", "W4-prefill"])
    parser.add_argument("--phase", default="decode", choices=["decode", "prefill"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=30)
    add_engine_args(parser)
    args = parser.parse_args()
    w = workloads.build(args.workload)
    llm = LLM(**engine_kwargs(args))
    engine = llm.engine
    for i, (p, n) in enumerate(zip(w.prompts, w.output_lens)):
        engine.add_request(str(i), p, SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=n))
    sched = engine.scheduler
    while args.phase == "decode" and ((sched.waiting and len(sched.running) < sched.max_num_seqs)
                                      or any(r.num_computed_tokens < r.num_prompt_tokens for r in sched.running)):
        engine.step()
    for _ in range(5 if args.phase == "decode" else 3):
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
