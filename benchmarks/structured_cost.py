"""What structured output costs: W1 plain, then with every request constrained by one of 8 JSON schemas
(round-robin; answers can run to max_tokens, ignore_eos), then plain again. One engine, one JSON line per
variant: output tok/s, and for the constrained run the host time per step filling bitmasks and the share of
those steps whose forward was still running when the fill ended (hidden behind the device).

    python benchmarks/structured_cost.py MODEL_DIR [--num-requests N]   (MODEL_DIR: the Qwen3-0.6B config)
"""
import argparse
import dataclasses
import json
import time

from pagedllm import LLM, SamplingParams
from pagedllm.bench.schemas import RUN_ON_SCHEMAS
from pagedllm.bench.workloads import build


def _params(i: int, k: int, constrained: bool) -> SamplingParams:
    so = {"json": RUN_ON_SCHEMAS[i % len(RUN_ON_SCHEMAS)]} if constrained else None
    return SamplingParams(temperature=1.0, ignore_eos=True, max_tokens=k, structured_outputs=so)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--num-requests", type=int, default=256)
    args = parser.parse_args()
    w = build("W1")
    prompts, lens = w.prompts[:args.num_requests], w.output_lens[:args.num_requests]
    llm = LLM(args.model, load_format="dummy", max_model_len=4096, log_stats_interval=0)
    start = time.perf_counter()   # warm-up: compiles the 8 schemas (first: the tokenizer's info too)
    llm.generate([list(range(1, 9))] * 8, [_params(i, 4, True) for i in range(8)], use_tqdm=False)
    print(json.dumps({"warmup_compile_s": round(time.perf_counter() - start, 2)}), flush=True)
    stats = llm.engine.core.structured.stats
    for variant, constrained in (("plain", False), ("constrained", True), ("plain again", False)):
        before = dataclasses.replace(stats)
        params = [_params(i, k, constrained) for i, k in enumerate(lens)]
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        num_out = sum(len(o.outputs[0].token_ids) for o in outs)
        line = {"variant": variant, "output_tok_s": round(num_out / seconds, 1), "output_tokens": num_out,
                "seconds": round(seconds, 3),
                "finish": {r: sum(o.outputs[0].finish_reason == r for o in outs) for r in ("length", "stop")}}
        steps = stats.num_steps - before.num_steps
        if steps:
            line.update({"mask_steps": steps,
                         "mask_fill_ms_per_step": round(1e3 * (stats.fill_seconds - before.fill_seconds) / steps, 3),
                         "mask_fill_hidden_share": round((stats.num_hidden - before.num_hidden) / steps, 3)})
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
