"""What structured output costs: W1 plain, then with every request constrained by one of 8 JSON schemas
(round-robin; no answer can complete before max_tokens, ignore_eos), then plain again. One engine, one JSON line per
variant: output tok/s, and for the constrained run the host time per step filling bitmasks and the share of
those steps whose forward was still running when the fill ended (hidden behind the device).

    python benchmarks/structured_cost.py MODEL_DIR [--num-requests N] [--reps R]   (MODEL_DIR: the Qwen3-0.6B config)

--reps R alternates R (plain, constrained) pairs, then plain once more: a host that changes pace within the
call shows in the spread. --no-text adds one more (plain, constrained) pair with detokenize=False: with dummy
weights the plain answers' random ids decode to text holding U+FFFD, which the deferred detokenizer re-decodes
through its windows at the end, while the constrained answers are clean JSON; without text neither pays for it.
--fill-threads N,M,... runs only text-free variants: plain, then a constrained run with xgrammar's batch fill on
each number of threads (the manager's matcher replaced between runs; the engine uses cores / 2), then plain again.
"""
import dataclasses
import json
import sys
import time

from w1_variants import run_variant, w1_engine

from pagedllm import SamplingParams
from pagedllm.bench.schemas import RUN_ON_SCHEMAS


def _params(i: int, k: int, constrained: bool, text: bool = True) -> SamplingParams:
    so = {"json": RUN_ON_SCHEMAS[i % len(RUN_ON_SCHEMAS)]} if constrained else None
    return SamplingParams(temperature=1.0, ignore_eos=True, max_tokens=k, structured_outputs=so, detokenize=text)


def _finish(outs) -> dict:
    reasons = [o.outputs[0].finish_reason for o in outs]
    return {r: reasons.count(r) for r in sorted(set(reasons), key=str)}


def main():
    llm, prompts, lens = w1_engine()
    start = time.perf_counter()   # warm-up: compiles the 8 schemas (first: the tokenizer's info too)
    llm.generate([list(range(1, 9))] * 8, [_params(i, 4, True) for i in range(8)], use_tqdm=False)
    print(json.dumps({"warmup_compile_s": round(time.perf_counter() - start, 2)}), flush=True)
    stats = llm.engine.core.structured.stats
    reps = int(sys.argv[sys.argv.index("--reps") + 1]) if "--reps" in sys.argv else 1
    # (variant, constrained, text, xgrammar fill threads: None = the engine's own matcher)
    order = [("plain", False, True, None), ("constrained", True, True, None)] * reps + [
        ("plain again", False, True, None)]
    if "--fill-threads" in sys.argv:
        counts = [int(n) for n in sys.argv[sys.argv.index("--fill-threads") + 1].split(",")]
        order = [("plain, no text", False, False, None)] + [
            (f"constrained, no text, {n} fill threads", True, False, n) for n in counts] + [
            ("plain again, no text", False, False, None)]
    elif "--no-text" in sys.argv:
        order += [("plain, no text", False, False, None), ("constrained, no text", True, False, None)]
    for variant, constrained, text, threads in order:
        if threads is not None:
            import xgrammar as xgr
            llm.engine.core.structured._batch = xgr.BatchGrammarMatcher(max_threads=threads)
        before = dataclasses.replace(stats)
        # Token totals and finish reasons of every run: a like-for-like pair generates the same tokens
        # (all "length"; an answer that completes its JSON early ends "stop" with fewer).
        run_variant(llm, variant, prompts, [_params(i, k, constrained, text) for i, k in enumerate(lens)],
                    output_tokens=lambda outs: sum(len(o.outputs[0].token_ids) for o in outs),
                    planned_tokens=lambda outs: sum(lens), finish=_finish)
        steps = stats.num_steps - before.num_steps
        if steps:
            fill_ms = 1e3 * (stats.fill_seconds - before.fill_seconds) / steps
            print(json.dumps({"variant": variant, "mask_steps": steps, "mask_fill_ms_per_step": round(fill_ms, 3),
                              "mask_fill_hidden_share": round((stats.num_hidden - before.num_hidden) / steps, 3)}),
                  flush=True)


if __name__ == "__main__":
    main()
