"""Where the time of a step goes: host time per phase of Engine.step over a workload, as one JSON line.

    python benchmarks/step_profile.py --workload W1 --model DIR --load-format dummy [--limit N] [engine flags]

Phases, in the order Engine.step runs them: schedule (step N+1, while step N runs), launch (N+1's inputs,
forward and sampler launches), wait (host blocked on N's sampled ids: device time not hidden by the host),
update (scheduler.update_from_output of N), process (output processing of N, while N+1 runs). Steps are
counted by the kind of the step launched: decode-only apart from steps that carry prompt tokens.
"""
import argparse
import json
import logging
import time
from collections import defaultdict

from pagedllm import LLM, SamplingParams
from pagedllm.bench import workloads
from pagedllm.cli import add_engine_args, engine_kwargs
from pagedllm.runner.model_runner import PendingOutput


def instrument(engine, totals, counts):
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

    def timed_schedule():
        out = schedule()
        decode = out.total_num_scheduled_tokens == len(out.num_scheduled_tokens)
        launched_kind.append("decode" if decode else "mixed")
        return out

    engine.scheduler.schedule = timed("schedule", timed_schedule)
    engine.runner.execute_async = timed("launch", engine.runner.execute_async)
    PendingOutput.result = timed("wait", PendingOutput.result)
    engine.scheduler.update_from_output = timed("update", engine.scheduler.update_from_output)
    engine.output_processor.process = timed("process", engine.output_processor.process)
    step = engine.step

    def timed_step():
        phases.clear()
        launched_kind.clear()
        outputs = step()
        if launched_kind:
            for name, dt in phases.items():
                totals[launched_kind[0]][name] += dt
            counts[launched_kind[0]] += 1
        return outputs

    engine.step = timed_step


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", required=True, choices=["W1", "W2", "W3"])
    parser.add_argument("--limit", type=int, default=None)
    add_engine_args(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    w = workloads.build(args.workload)
    prompts, out_lens = w.prompts[:args.limit], w.output_lens[:args.limit]
    llm = LLM(**engine_kwargs(args))
    engine = llm.engine
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4), use_tqdm=False)
    totals = defaultdict(lambda: defaultdict(float))
    counts = defaultdict(int)
    instrument(engine, totals, counts)
    params = [SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=n) for n in out_lens]
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    report = {"workload": args.workload, "requests": len(prompts), "seconds": round(seconds, 3),
              "output_tok_s": round(sum(out_lens) / seconds, 1)}
    for kind in ("decode", "mixed"):
        n = max(counts[kind], 1)
        report[kind] = {"steps": counts[kind], **{f"{k}_ms": round(v / n * 1e3, 3) for k, v in totals[kind].items()}}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
