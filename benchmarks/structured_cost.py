"""What structured output costs: W1 plain, then with every request constrained by one of 8 JSON schemas
(round-robin; answers can run to max_tokens, ignore_eos), then plain again. One engine, one JSON line per
variant: output tok/s, and for the constrained run the host time per step filling bitmasks and the share of
those steps whose forward was still running when the fill ended (hidden behind the device).

    python benchmarks/structured_cost.py MODEL_DIR [--num-requests N]   (MODEL_DIR: the Qwen3-0.6B config)
"""
import dataclasses
import json
import time

from w1_variants import run_variant, w1_engine

from pagedllm import SamplingParams
from pagedllm.bench.schemas import RUN_ON_SCHEMAS


def _params(i: int, k: int, constrained: bool) -> SamplingParams:
    so = {"json": RUN_ON_SCHEMAS[i % len(RUN_ON_SCHEMAS)]} if constrained else None
    return SamplingParams(temperature=1.0, ignore_eos=True, max_tokens=k, structured_outputs=so)


def main():
    llm, prompts, lens = w1_engine()
    start = time.perf_counter()   # warm-up: compiles the 8 schemas (first: the tokenizer's info too)
    llm.generate([list(range(1, 9))] * 8, [_params(i, 4, True) for i in range(8)], use_tqdm=False)
    print(json.dumps({"warmup_compile_s": round(time.perf_counter() - start, 2)}), flush=True)
    stats = llm.engine.core.structured.stats
    for variant, constrained in (("plain", False), ("constrained", True), ("plain again", False)):
        before = dataclasses.replace(stats)
        outs = run_variant(llm, variant, prompts, [_params(i, k, constrained) for i, k in enumerate(lens)],
                           output_tokens=lambda outs: sum(len(o.outputs[0].token_ids) for o in outs))
        steps = stats.num_steps - before.num_steps
        finish = {r: sum(o.outputs[0].finish_reason == r for o in outs) for r in ("length", "stop")}
        if steps:
            print(json.dumps({"variant": variant, "finish": finish, "mask_steps": steps,
                              "mask_fill_ms_per_step": round(1e3 * (stats.fill_seconds - before.fill_seconds) / steps, 3),
                              "mask_fill_hidden_share": round((stats.num_hidden - before.num_hidden) / steps, 3)}),
                  flush=True)


if __name__ == "__main__":
    main()
