"""Why a process's first run of a workload is slower than its second. On the H200 (2026-12-04) a base W1 ran at
22,270 then 24,145 tok/s in one process, and a machine's first process of a kind ran ~10% below later ones.

Runs the workload twice on one engine after bench throughput's warm-up (the prefix cache emptied before each run)
and reports, per run: seconds and tok/s; its steps' seconds by tenths of the run and its slowest steps; the
Triton kernels built during it (compiled, or read from the disk cache: name, seconds and specialisation key
each); the CUDA caching allocator's device allocations (cudaMalloc calls) and the bytes it then holds; the garbage
collections of 2 ms or more (generation, ms, step). What the first run builds or allocates and the second does not
is what the warm-up misses. On the H200 a decode kernel
built mid-run (0.49 s) until 2a7c972; after it, 6.66 against 6.19 s, no build in either run.

    python benchmarks/first_run.py --workload W1 --model DIR --load-format dummy [--trace-allocs] [engine flags]

On the H200 (2026-12-04, 4ac877d) run 1 still had a 263 ms step and 5 cudaMalloc calls that run 2 had not
(22,484 against 24,249 tok/s); --trace-allocs says where those allocations come from. On the H200 (8f92a28) they
are the first 16,384-token prefill steps' (q, the MLP's activations: 64, 32, 2 x 96 MB; step 0 58.8 ms against
39.0 in run 2), not the slow step (214.7 ms at step 436). On CPU (full W1, tiny model) no collection in run 1 took
over 2.2 ms and no decode step stood out.
"""
import argparse
import gc
import json
import time

import torch

from pagedllm import LLM, SamplingParams
from pagedllm.bench import workloads
from pagedllm.bench.throughput import WARMUP_PROMPT, WARMUP_TOKENS
from pagedllm.cli import add_engine_args, engine_kwargs


def watch_triton_builds(builds: list):
    """Appends (kernel name, seconds, key) for every kernel Triton builds from here on (in-memory cache misses)."""
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:   # CPU without Triton: nothing to watch
        return
    if not hasattr(JITFunction, "_do_compile"):
        print(json.dumps({"note": "this Triton has no JITFunction._do_compile: builds not watched"}))
        return
    build = JITFunction._do_compile

    def timed_build(self, key, *args, **kwargs):
        start = time.perf_counter()
        try:
            return build(self, key, *args, **kwargs)
        finally:   # the key holds the arguments' specialisation (1, 16 | n, pointer alignment): what changed
            builds.append((self.fn.__name__, round(time.perf_counter() - start, 3), str(key)[:400]))
    JITFunction._do_compile = timed_build


def watch_gc(collections: list, steps: list, min_ms: float = 2.0):
    """Appends [generation, ms, step index] for every garbage collection of min_ms or more from here on: a full
    collection walks every tracked object not frozen at start-up, and a run's first one may stand out."""
    started = [0.0]

    def on_gc(phase, info):
        if phase == "start":
            started[0] = time.perf_counter()
        elif (ms := (time.perf_counter() - started[0]) * 1e3) >= min_ms:
            collections.append([info["generation"], round(ms, 1), len(steps)])
    gc.callbacks.append(on_gc)


def time_steps(engine) -> tuple[list, list]:
    """Wraps engine.step: the first list it returns gets each step's seconds, the second the CUDA graph the
    runner chose for the step it launched ([padded tokens, mixed], or None: eager)."""
    seconds, kinds, step, runner = [], [], engine.step, engine.runner
    graph_key, chosen = runner._graph_key, [None]

    def key(*args):
        chosen[0] = graph_key(*args)
        return chosen[0]

    def timed():
        start = time.perf_counter()
        try:
            return step()
        finally:
            seconds.append(time.perf_counter() - start)
            kinds.append(chosen[0])
    engine.step, runner._graph_key = timed, key
    return seconds, kinds


def step_spread(seconds: list, kinds: list) -> dict:
    """Where a run's time lies: its steps' seconds in tenths of the run (by step index) and its slowest steps
    (index, ms, the graph of the step launched then); set beside another run's, a slow start or a uniformly
    slower run shows."""
    n = len(seconds)
    tenths = [round(sum(seconds[i * n // 10:(i + 1) * n // 10]), 3) for i in range(10)]
    slowest = sorted(range(n), key=lambda i: -seconds[i])[:6]
    return {"steps": n, "tenths_s": tenths,
            "slowest_ms": [[i, round(seconds[i] * 1e3, 1), kinds[i]] for i in slowest]}


def segment_events(max_events: int = 30) -> list:
    """The allocator's device-memory events recorded since _record_memory_history: cudaMalloc ("segment_alloc"),
    cudaFree ("segment_free") and out-of-memory retries ("oom"), each with its size (MiB) and the innermost
    Python frames of pagedllm that asked for it."""
    events = []
    for trace in torch.cuda.memory._snapshot().get("device_traces", []):
        for e in trace:
            if e.get("action") not in ("segment_alloc", "segment_free", "oom"):
                continue
            frames = [f"{f['filename'].rsplit('pagedllm/', 1)[-1]}:{f['line']} {f['name']}"
                      for f in e.get("frames", []) if "pagedllm/" in f.get("filename", "")][:4]
            events.append([e["action"], round(e.get("size", 0) / 2**20, 1), frames])
    return events[:max_events]


def allocator() -> dict:
    if not torch.cuda.is_available():
        return {}
    stats = torch.cuda.memory_stats()
    return {"device_allocs": stats.get("num_device_alloc", 0),
            "reserved_gib": round(stats.get("reserved_bytes.all.current", 0) / 2**30, 2)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", required=True, choices=["W1", "W2", "W3"])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--num-requests", type=int, default=None, help="only the first N requests (CPU checks)")
    parser.add_argument("--trace-allocs", action="store_true",
                        help="run 1 records the allocator's history: its cudaMalloc calls with their stacks")
    add_engine_args(parser)
    args = parser.parse_args()
    w = workloads.build(args.workload)
    prompts, out_lens = w.prompts[:args.num_requests], w.output_lens[:args.num_requests]
    builds: list = []
    watch_triton_builds(builds)
    llm = LLM(**engine_kwargs(args))
    llm.generate([WARMUP_PROMPT], SamplingParams(max_tokens=WARMUP_TOKENS, ignore_eos=True), use_tqdm=False)
    print(json.dumps({"start_up_builds": len(builds), "start_up_build_seconds": round(sum(b[1] for b in builds), 2),
                      "start_up_builds_list": builds[:60],
                      **allocator()}), flush=True)
    params = [SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=n) for n in out_lens]
    steps, kinds = time_steps(llm.engine)
    collections: list = []
    watch_gc(collections, steps)
    for run in range(args.runs):
        llm.reset_prefix_cache()
        builds.clear()
        steps.clear()
        kinds.clear()
        collections.clear()
        before = allocator()
        trace = args.trace_allocs and run == 0 and torch.cuda.is_available()
        if trace:   # stacks for every allocation: this run's timing is not comparable
            torch.cuda.memory._record_memory_history(max_entries=500_000)
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        after = allocator()
        if trace:
            print(json.dumps({"run": 1, "device_memory_events": segment_events()}), flush=True)
            torch.cuda.memory._record_memory_history(enabled=None)
        print(json.dumps({"run": run + 1, "seconds": round(seconds, 3),
                          "output_tok_s": round(sum(out_lens) / seconds, 1),
                          "triton_builds": builds[:40], "triton_build_seconds": round(sum(b[1] for b in builds), 3),
                          "device_allocs": after.get("device_allocs", 0) - before.get("device_allocs", 0),
                          "reserved_gib": after.get("reserved_gib"), **step_spread(steps, kinds),
                          "gc_over_2ms": collections[:20]}), flush=True)


if __name__ == "__main__":
    main()
