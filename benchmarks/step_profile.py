"""Where the time of a step goes: host time per phase of Engine.step over a workload, as one JSON line.

    python benchmarks/step_profile.py --workload W1 --model DIR --load-format dummy [--limit N] [engine flags]

Phases: schedule (scheduler), launch (inputs + forward + sampler launches), process (output processing of
the previous step, overlapping the GPU), wait (host blocked on the sampled ids: GPU time not hidden), update
(scheduler.update_from_output). Decode-only steps are counted apart from steps that carry prompt tokens.
"""
import argparse
import json
import logging
import time
from collections import defaultdict

from pagedllm import LLM, SamplingParams
from pagedllm.bench import workloads
from pagedllm.cli import add_engine_args, engine_kwargs
from pagedllm.request import RequestStatus


def timed_step(engine, totals, counts):
    clock = time.perf_counter
    t0 = clock()
    sched_out = engine.scheduler.schedule()
    t1 = clock()
    pending = engine.runner.execute_async(sched_out)
    t2 = clock()
    outputs, stopped = engine.output_processor.process(engine._unprocessed)
    engine.scheduler.finish_requests(stopped, RequestStatus.FINISHED_STOPPED)
    t3 = clock()
    runner_out = pending.result()
    t4 = clock()
    engine._unprocessed = engine.scheduler.update_from_output(sched_out, runner_out)
    t5 = clock()
    kind = "decode" if sched_out.total_num_scheduled_tokens == len(sched_out.num_scheduled_tokens) else "mixed"
    for name, dt in (("schedule", t1 - t0), ("launch", t2 - t1), ("process", t3 - t2), ("wait", t4 - t3),
                     ("update", t5 - t4)):
        totals[kind][name] += dt
    counts[kind] += 1
    return outputs


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
    engine.step = lambda: timed_step(engine, totals, counts)
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
