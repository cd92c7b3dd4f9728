"""Where a speculative step's time goes (batch 1, W5 shape, synthetic acceptance 0.8): host time of each part
of EngineCore._spec_step (no added syncs), a torch profiler table of the same steps, then the device time of
each pass: the target's decode graph (1 row) and verify graph (k+1 rows, padded to the capture size), the
draft's (1 and 2 rows), each one's LM head, and the kernels inside each graph by name (20 replays) against the
replay's time. A replay after the run re-runs the last step's inputs (its KV writes land in freed blocks).

    python benchmarks/spec_step_profile.py TARGET_DIR DRAFT_DIR

H100, 854b694 (before the small steps' 128-token decode segments): target decode 6.43 ms (434 kernels summing
6.26; decode_partition 16.3 us a layer), verify 6.54, LM head 0.45; draft pass 1.51 ms (310 kernels summing
1.36; decode_partition 16.2 us a layer, 30%), LM head with argmax 0.13. H100, c700806: target decode 6.11 ms,
verify 6.26, draft pass 1.25 (decode_partition 6.6 us a layer); a step's trace showed the verify running
shared_prefix (16.5 us a layer, since dropped for small steps) and the device waiting for the host between the
rejection sampler's copy and the first draft pass. With TRACE=path.json, the profiled steps' timeline is saved there.
"""
import collections
import functools
import json
import os
import sys
import time

import numpy as np
import torch
from triton.testing import do_bench

from pagedllm import LLM, SamplingParams

K = 4
TIMES = collections.defaultdict(float)
COUNTS = collections.Counter()


def timed(obj, name, label):
    fn = getattr(obj, name)

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        start = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            TIMES[label] += time.perf_counter() - start
            COUNTS[label] += 1
    setattr(obj, name, wrapper)


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


def report_pass(name, fn, head):
    ms = do_bench(fn, warmup=50, rep=300, return_mode="median")
    head_ms = do_bench(head, warmup=50, rep=300, return_mode="median")
    table = kernels(fn)
    n, us = sum(v[0] for v in table.values()), sum(v[1] for v in table.values())
    print(json.dumps({"pass": name, "replay_ms": round(ms, 4), "lm_head_ms": round(head_ms, 4),
                      "kernels_a_pass": round(n, 1), "kernel_sum_ms": round(us / 1e3, 4)}), flush=True)
    for kname, (calls, kus) in sorted(table.items(), key=lambda x: -x[1][1])[:16]:
        print(f"    {kus:8.1f} us {calls:6.1f} calls {kus / max(calls, 1):6.2f} us each  {kname[:110]}")


def device_timeline(llm, prompt, params):
    """Per step, from CUDA events (no profiler, no host timers): the draft's passes (first launch to last), the
    target's part (its input build, verify, LM head, rejection sampler), the pre-pass behind it (the next
    step's draft passes, DraftModel.prepass; 0 where none ran) and the device's wait from there to the next
    step's propose (the host: result, update, schedule)."""
    runner, steps = llm.engine.core.runner, []
    draft = runner.draft
    propose, verify, prepass = draft.propose, runner._verify, draft.prepass

    def event():
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def timed_propose(*a, **kw):
        start = event()
        out = propose(*a, **kw)
        steps.append({"start": start, "drafts": event()})
        return out

    def timed_verify(*a, **kw):
        out = verify(*a, **kw)
        steps[-1]["target"] = steps[-1]["prepass"] = event()
        return out

    def timed_prepass(*a, **kw):
        out = prepass(*a, **kw)
        steps[-1]["prepass"] = event()
        return out
    draft.propose, runner._verify, draft.prepass = timed_propose, timed_verify, timed_prepass
    start = time.perf_counter()
    llm.generate([prompt], params, use_tqdm=False)
    wall = time.perf_counter() - start
    draft.propose, runner._verify, draft.prepass = propose, verify, prepass
    torch.cuda.synchronize()
    steps = [s for s in steps if "target" in s]
    median = lambda xs: round(float(np.median(xs)), 3)  # noqa: E731
    print(json.dumps({"timeline_steps": len(steps), "wall_ms_a_step": round(wall * 1e3 / len(steps), 3),
                      "drafts_ms": median([s["start"].elapsed_time(s["drafts"]) for s in steps]),
                      "target_ms": median([s["drafts"].elapsed_time(s["target"]) for s in steps]),
                      "prepass_ms": median([s["target"].elapsed_time(s["prepass"]) for s in steps]),
                      "wait_for_host_ms": median([a["prepass"].elapsed_time(b["start"])
                                                  for a, b in zip(steps, steps[1:])])}), flush=True)


def main():
    target, draft = sys.argv[1:3]
    spec = {"method": "draft_model", "model": draft, "num_speculative_tokens": K,
            "rejection_sample_method": "synthetic", "synthetic_acceptance_rates": [0.8, 0.64, 0.512, 0.4096]}
    llm = LLM(target, load_format="dummy", max_model_len=4096, log_stats_interval=0, skip_tokenizer_init=True,
              speculative_config=spec)
    prompt = np.random.default_rng(1).integers(0, 10000, size=1000).tolist()
    params = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True)
    llm.generate([prompt], params, use_tqdm=False)
    if torch.cuda.is_available():
        device_timeline(llm, prompt[:-1] + [6], params)
    core = llm.engine.core
    runner = core.runner
    timed(core, "_spec_step", "spec_step (all)")
    timed(core.scheduler, "schedule", "schedule")
    timed(core.scheduler, "update_from_output", "update_from_output")
    timed(core.speculator, "propose", "propose (policy)")
    timed(runner, "execute_async", "execute_async (all launches)")
    timed(runner.draft, "propose", "draft.propose (launches)")
    timed(runner.draft, "_wait_for_host_arrays", "draft: wait for host arrays")
    timed(runner.buffers, "build", "target build")
    timed(runner, "_verify", "rejection sample launch")
    timed(runner.draft.model, "compute_logits", "draft logits")
    import pagedllm.runner.model_runner as mr
    timed(mr.PendingOutput, "result", "result (waits for the device)")
    start = time.perf_counter()
    out = llm.generate([prompt[:-1] + [7]], params, use_tqdm=False)
    wall = time.perf_counter() - start
    steps = COUNTS["spec_step (all)"]
    print(f"wall {wall:.3f} s, {len(out[0].outputs[0].token_ids)} tokens, {steps} spec steps, "
          f"{wall / steps * 1e3:.2f} ms a step")
    for label, t in sorted(TIMES.items(), key=lambda x: -x[1]):
        print(f"{label:40s} {t / steps * 1e3:8.3f} ms a step  ({COUNTS[label]} calls)")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        llm.generate([prompt[:-1] + [8]], SamplingParams(temperature=0, max_tokens=64, ignore_eos=True),
                     use_tqdm=False)
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60))
    if os.environ.get("TRACE"):   # the same steps' timeline, to see what runs between the graphs
        prof.export_chrome_trace(os.environ["TRACE"])
    if runner.graphs is None:   # the CPU: no graphs to replay
        return
    tm, dm = runner.model, runner.draft.model
    tg, dg = runner.graphs, runner.draft.graphs
    verify_size = tg.padded_size(K + 1, False)
    for name, graphs, size, model, rows, argmax in [
            ("target decode", tg, 1, tm, 1, False), (f"target verify ({verify_size} rows)", tg, verify_size, tm,
                                                      K + 1, False),
            ("draft 1 row", dg, 1, dm, 1, True), ("draft 2 rows", dg, 2, dm, 2, True)]:
        hidden = torch.randn(rows, model.config.hidden_size, device=runner.device, dtype=runner.dtype)

        def head(model=model, hidden=hidden, argmax=argmax):   # the draft takes its argmax, the target samples
            logits = model.compute_logits(hidden)
            return logits.argmax(-1) if argmax else logits
        report_pass(name, lambda g=graphs, s=size: g.replay(s, False), head)


if __name__ == "__main__":
    main()
