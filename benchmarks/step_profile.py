"""Where the time of a step goes: host time per phase of Engine.step over a workload, as one JSON line.

    python benchmarks/step_profile.py --workload W1 --model DIR --load-format dummy [--limit N] [engine flags]

Phases, in the order Engine.step runs them: schedule (step N+1, while step N runs), launch (N+1's inputs,
forward and sampler launches), wait (host blocked on N's sampled ids: device time not hidden by the host),
update (scheduler.update_from_output of N), process (output processing of N, while N+1 runs). Steps are
counted by the kind of the step launched: decode-only apart from steps that carry prompt tokens.
--json-schemas constrains every request by one of the 8 run-on JSON schemas (as structured_cost.py); then fill
is the bitmask fill and the constrained sampling launch of the step just launched. --lora-adapters N profiles the
workload twice on one engine with LoRA on (max_loras N, ranks up to --max-lora-rank): with no adapter, then with N
random adapters round-robin (lora_throughput.py's); each the last of --reps runs (the prefix cache emptied first).
--kernels N also records N decode steps of that last run with torch.profiler (from its 200th decode step) and lists
the device time a step of each kernel (CUDA graphs' kernels included): where a step's device time goes.
"""
import argparse
import dataclasses
import json
import logging
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from pagedllm import LLM, SamplingParams
from pagedllm.bench import workloads
from pagedllm.bench.schemas import RUN_ON_SCHEMAS
from pagedllm.cli import add_engine_args, engine_kwargs
from pagedllm.runner.model_runner import PendingOutput


class KernelWindow:
    """torch.profiler over decode steps first .. first + steps - 1 of an armed run; report(): kernels by device
    time a step (the window's total over its steps: the launches pipeline one step ahead, so the edges blur)."""

    def __init__(self, steps: int, first: int = 200):
        self.steps, self.first = steps, first
        self.decode_steps, self.prof, self.armed, self.events = 0, None, False, None

    def arm(self):
        self.decode_steps, self.armed, self.events = 0, True, None

    def after_step(self, kind: str):
        if not self.armed or kind != "decode":
            return
        self.decode_steps += 1
        if self.decode_steps == self.first:
            import torch.profiler
            kind = "CUDA" if torch.cuda.is_available() else "CPU"   # CPU (checks): the ops' own times
            self.prof = torch.profiler.profile(activities=[getattr(torch.profiler.ProfilerActivity, kind)])
            self.prof.start()
        elif self.decode_steps == self.first + self.steps:
            self.prof.stop()
            self.armed, self.events = False, self.prof.events()

    def report(self, top: int = 25) -> dict:
        if self.events is None:
            return {"kernels": f"fewer than {self.first + self.steps} decode steps: nothing recorded"}
        from torch.autograd import DeviceType
        by_name = defaultdict(lambda: [0.0, 0])
        for e in self.events:
            if e.device_type == DeviceType.CUDA or not torch.cuda.is_available():
                us = e.time_range.elapsed_us() if e.device_type == DeviceType.CUDA else e.self_cpu_time_total
                by_name[e.name][0] += us
                by_name[e.name][1] += 1
        ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])
        total = sum(us for us, _ in by_name.values())
        return {"kernel_steps": self.steps, "device_us_a_step": round(total / self.steps, 1),
                "kernels": [[name[:90], round(us / self.steps, 1), round(n / self.steps, 2)]
                            for name, (us, n) in ranked[:top]]}


def instrument(engine, totals, counts, window: KernelWindow | None = None):
    """Times the phases of the real Engine.step by wrapping the calls it makes; each call's phases are
    counted under the kind of the step it launched (calls that launch none are not counted)."""
    clock = time.perf_counter
    phases = {}
    launched_kind = []

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                phases[name] = phases.get(name, 0.0) + clock() - t
        return wrapper

    schedule = engine.scheduler.schedule

    def timed_schedule(*args, **kwargs):
        out = schedule(*args, **kwargs)
        if out.total_num_scheduled_tokens == 0:
            launched_kind.append("empty")
            return out
        decode = out.total_num_scheduled_tokens == len(out.num_scheduled_tokens)
        launched_kind.append("decode" if decode else "mixed")
        return out

    engine.scheduler.schedule = timed("schedule", timed_schedule)
    engine.runner.execute_async = timed("launch", engine.runner.execute_async)
    PendingOutput.result = timed("wait", PendingOutput.result)
    engine.scheduler.update_from_output = timed("update", engine.scheduler.update_from_output)
    engine.output_processor.process = timed("process", engine.output_processor.process)
    engine.core._sample_constrained = timed("fill", engine.core._sample_constrained)
    step = engine.step

    def timed_step():
        phases.clear()
        launched_kind.clear()
        outputs = step()
        if launched_kind:
            for name, dt in phases.items():
                totals[launched_kind[0]][name] += dt
            counts[launched_kind[0]] += 1
            if window is not None:
                window.after_step(launched_kind[0])
        return outputs

    engine.step = timed_step


def profile(llm, prompts, params, loras, label: str, reps: int, totals, counts,
            window: KernelWindow | None = None) -> dict:
    """The last of reps timed runs (the prefix cache emptied before each), its phases per step; totals and counts
    are instrument()'s, emptied before each run. window: armed for the last run, its kernels reported."""
    for rep in range(reps):
        if window is not None and rep == reps - 1:
            window.arm()
        llm.reset_prefix_cache()
        totals.clear()
        counts.clear()
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False, lora_request=loras)
        seconds = time.perf_counter() - start
    report = {"run": label, "requests": len(prompts), "seconds": round(seconds, 3),
              "output_tok_s": round(sum(p.max_tokens for p in params) / seconds, 1), "empty_steps": counts["empty"]}
    for kind in ("decode", "mixed"):
        n = max(counts[kind], 1)
        report[kind] = {"steps": counts[kind], **{f"{k}_ms": round(v / n * 1e3, 3) for k, v in totals[kind].items()}}
    if window is not None:
        report.update(window.report())
    return report


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", required=True, choices=["W1", "W2", "W3"])
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--json-schemas", action="store_true", help="every request under a run-on JSON schema")
    parser.add_argument("--lora-adapters", type=int, default=0, help="profile without and with N adapters")
    parser.add_argument("--reps", type=int, default=1, help="runs of each profile; the last is reported")
    parser.add_argument("--kernels", type=int, default=0, help="record N decode steps of the last run's kernels")
    add_engine_args(parser)
    args = parser.parse_args()
    if args.lora_adapters:
        args.enable_lora, args.max_loras = True, args.lora_adapters
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    w = workloads.build(args.workload)
    prompts, out_lens = w.prompts[:args.limit], w.output_lens[:args.limit]
    llm = LLM(**engine_kwargs(args))
    engine = llm.engine
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4), use_tqdm=False)
    schemas = RUN_ON_SCHEMAS if args.json_schemas else [None]
    params = [SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=n,
                             structured_outputs=schemas[i % len(schemas)] and {"json": schemas[i % len(schemas)]})
              for i, n in enumerate(out_lens)]
    if args.json_schemas:   # compile the 8 schemas before the timed run
        warm = [dataclasses.replace(p, max_tokens=8) for p in params[:len(schemas)]]
        llm.generate([[1, 2, 3]] * len(warm), warm, use_tqdm=False)
        engine.core.structured.stats = type(engine.core.structured.stats)()   # the timed run's alone
    totals, counts = defaultdict(lambda: defaultdict(float)), defaultdict(int)
    window = KernelWindow(args.kernels) if args.kernels else None
    instrument(engine, totals, counts, window)
    if args.lora_adapters:
        lora_profiles(llm, prompts, params, args, totals, counts, window)
        return
    report = {"workload": args.workload, "json_schemas": args.json_schemas,
              **profile(llm, prompts, params, None, "plain", args.reps, totals, counts, window)}
    stats = engine.core.structured.stats
    if stats.num_steps:
        report["bitmask"] = {"steps": stats.num_steps, "fill_ms": round(stats.fill_seconds / stats.num_steps * 1e3, 3),
                             "hidden_share": round(stats.num_hidden / stats.num_steps, 3)}
    print(json.dumps(report))


def lora_profiles(llm, prompts, params, args, totals, counts, window: KernelWindow | None):
    from lora_throughput import load_adapters, write_adapters   # benchmarks/ is this script's directory
    cfg = json.loads((Path(args.model) / "config.json").read_text())
    tmp = Path(tempfile.mkdtemp(prefix="step_profile_lora_"))
    try:
        loras = write_adapters(tmp, cfg, args.max_lora_rank, args.lora_adapters)
        load_adapters(llm, loras)
        assigned = [loras[i % len(loras)] for i in range(len(prompts))]
        for label, req in (("base rows", None), (f"{len(loras)} adapters", assigned)):
            report = profile(llm, prompts, params, req, label, args.reps, totals, counts, window)
            print(json.dumps({"workload": args.workload, **report}), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
