"""Device time of one forward pass at batch 1, W5 shape (issue 16): the target's decode graph (1 row) and verify
graph (k+1 rows, padded to the capture size), the draft's pass (1 and 2 rows), each one's LM head, then the kernels
inside each graph by name (torch profiler over 20 replays) and the sum of their times against the replay's.

    python benchmarks/spec_pass_cost.py TARGET_DIR DRAFT_DIR

A replay after the run re-runs the last step's inputs (its KV writes land in freed blocks): the time is the
pass's, the output is not used. One JSON line per pass, then a kernel table per pass.
"""
import collections
import json
import sys

import numpy as np
import torch
from triton.testing import do_bench

from pagedllm import LLM, SamplingParams

K = 4


def kernels(fn, reps=20):
    """{kernel name: (calls a pass, us a pass)} of fn's CUDA kernels, from the profiler."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    out = collections.defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            out[e.name][0] += 1
            out[e.name][1] += e.time_range.elapsed_us()
    return {name: (n / reps, us / reps) for name, (n, us) in out.items()}


def report(name, fn, head):
    ms = do_bench(fn, warmup=50, rep=300, return_mode="median")
    head_ms = do_bench(head, warmup=50, rep=300, return_mode="median")
    table = kernels(fn)
    n, us = sum(v[0] for v in table.values()), sum(v[1] for v in table.values())
    print(json.dumps({"pass": name, "replay_ms": round(ms, 4), "lm_head_ms": round(head_ms, 4),
                      "kernels_a_pass": round(n, 1), "kernel_sum_ms": round(us / 1e3, 4)}), flush=True)
    for kname, (calls, kus) in sorted(table.items(), key=lambda x: -x[1][1])[:16]:
        print(f"    {kus:8.1f} us {calls:6.1f} calls {kus / max(calls, 1):6.2f} us each  {kname[:110]}")


def main():
    target, draft = sys.argv[1:3]
    spec = {"method": "draft_model", "model": draft, "num_speculative_tokens": K,
            "rejection_sample_method": "synthetic", "synthetic_acceptance_rates": [0.8, 0.64, 0.512, 0.4096]}
    llm = LLM(target, load_format="dummy", max_model_len=4096, log_stats_interval=0, skip_tokenizer_init=True,
              speculative_config=spec)
    prompt = np.random.default_rng(1).integers(0, 10000, size=1000).tolist()
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=64, ignore_eos=True), use_tqdm=False)
    runner = llm.engine.core.runner
    tm, dm = runner.model, runner.draft.model
    dev, dtype = runner.device, next(tm.parameters()).dtype
    tg, dg = runner.graphs, runner.draft.graphs
    verify_size = tg.padded_size(K + 1, False)
    for name, graphs, size, model, rows, argmax in [
            ("target decode", tg, 1, tm, 1, False), (f"target verify ({verify_size} rows)", tg, verify_size, tm,
                                                      K + 1, False),
            ("draft 1 row", dg, 1, dm, 1, True), ("draft 2 rows", dg, 2, dm, 2, True)]:
        h = torch.randn(rows, model.config.hidden_size, device=dev, dtype=dtype)
        head = (lambda m=model, h=h: m.compute_logits(h).argmax(-1)) if argmax else \
            (lambda m=model, h=h: m.compute_logits(h))
        report(name, lambda g=graphs, s=size: g.replay(s, False), head)


if __name__ == "__main__":
    main()
