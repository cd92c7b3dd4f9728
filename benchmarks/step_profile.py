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
from pagedllm.request import RequestStatus


def timed_step(engine, totals, counts):
    clock = time.perf_counter
    t0 = clock()
    launched = None
    if engine.scheduler.has_unfinished_requests():
        sched_out = engine.scheduler.schedule()
        t1 = clock()
        launched = (sched_out, engine.runner.execute_async(sched_out))
    t2 = clock()
    outputs, t3, t4 = [], t2, t2
    if engine._in_flight is not None:
        runner_out = engine._in_flight[1].result()
        t3 = clock()
        core_outputs = engine.scheduler.update_from_output(engine._in_flight[0], runner_out)
        t4 = clock()
        outputs, stopped = engine.output_processor.process(core_outputs)
        engine.scheduler.finish_requests(stopped, RequestStatus.FINISHED_STOPPED)
    t5 = clock()
    engine._in_flight = launched
    if launched is None:
        return outputs
    sched_out = launched[0]
    kind = "decode" if sched_out.total_num_scheduled_tokens == len(sched_out.num_scheduled_tokens) else "mixed"
    for name, dt in (("schedule", t1 - t0), ("launch", t2 - t1), ("wait", t3 - t2), ("update", t4 - t3),
                     ("process", t5 - t4)):
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
