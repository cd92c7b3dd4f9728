"""`pagedllm bench latency`: vLLM 0.26's `vllm bench latency`: the seconds one batch of --batch-size random prompts
of --input-len tokens takes to generate --output-len tokens each, over --num-iters runs after --num-iters-warmup.

As vLLM: temperature 1.0, top_p 1.0, ignore_eos, prefix caching off by default (repeated prompts would hit it),
its printed lines and its --output-json keys (avg_latency, latencies, percentiles). Prompt ids are drawn below
10,000, or below a smaller model's vocabulary (vLLM's ids past it would be refused), seeded by --seed.
--profile (with --profiler-config, as vLLM's) traces one batch after the warm-up instead of timing any.
"""
import argparse
import json
import time

import numpy as np

from pagedllm.profiler import ENABLE_HINT, ProfilerConfig

PERCENTAGES = (10, 25, 50, 75, 90, 99)


def add_cli_args(parser: argparse.ArgumentParser):
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--n", type=int, default=1, help="outputs per prompt (beam width with --use-beam-search)")
    parser.add_argument("--use-beam-search", action="store_true")
    parser.add_argument("--num-iters-warmup", type=int, default=10)
    parser.add_argument("--num-iters", type=int, default=30)
    parser.add_argument("--profile", action="store_true", help="profile one batch after the warm-up (no latencies) "
                        "with the profiler that --profiler-config sets up, as vLLM's")
    parser.add_argument("--output-json", default=None, help="write vLLM's result JSON to this file")
    parser.add_argument("--disable-detokenize", action="store_true", help="outputs are token ids only")


def _check(args: argparse.Namespace, profiler: ProfilerConfig):
    if args.profile and not profiler.enabled:   # vLLM's fails at start_profile, after the warm-up
        raise ValueError(f"--profile needs a profiler: {ENABLE_HINT}")
    for name, low in (("input_len", 1), ("output_len", 1), ("batch_size", 1), ("n", 1), ("num_iters_warmup", 0),
                      ("num_iters", 1)):
        if getattr(args, name) < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")


def main(args: argparse.Namespace, engine_kwargs: dict) -> dict | None:
    """The latencies' report, or None with --profile (vLLM's: the profiled batch is not timed)."""
    profiler = ProfilerConfig.parse(engine_kwargs.get("profiler_config"))
    _check(args, profiler)
    from pagedllm.beam_search import BeamSearchParams
    from pagedllm.llm import LLM
    from pagedllm.sampling_params import SamplingParams
    llm = LLM(**engine_kwargs)
    engine = llm.engine
    if engine.max_model_len < args.input_len + args.output_len:
        raise ValueError(f"--input-len + --output-len ({args.input_len + args.output_len}) must fit max_model_len "
                         f"({engine.max_model_len})")
    rng = np.random.default_rng(engine_kwargs["seed"])
    prompts = [{"prompt_token_ids": p} for p in
               rng.integers(0, min(10000, engine.vocab_size), size=(args.batch_size, args.input_len)).tolist()]
    params = SamplingParams(n=args.n, temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=args.output_len,
                            detokenize=not args.disable_detokenize)

    def one_run() -> float:
        start = time.perf_counter()
        if args.use_beam_search:
            llm.beam_search(prompts, BeamSearchParams(beam_width=args.n, max_tokens=args.output_len, ignore_eos=True))
        else:
            llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start

    print("Warming up...", flush=True)
    for _ in range(args.num_iters_warmup):
        one_run()
    if args.profile:
        if profiler.profiler == "torch":
            print(f"Profiling with torch profiler (results will be saved to {profiler.torch_profiler_dir})...",
                  flush=True)
        else:
            print("Profiling with cuda profiler ...", flush=True)
        llm.start_profile()
        one_run()
        llm.stop_profile()
        llm.shutdown()
        return None
    latencies = np.array([one_run() for _ in range(args.num_iters)])
    llm.shutdown()
    return report(latencies, args.output_json)


def report(latencies: np.ndarray, output_json: str | None) -> dict:
    """vLLM's lines and JSON keys (percentiles keyed by the percentage)."""
    percentiles = np.percentile(latencies, PERCENTAGES)
    print(f"Avg latency: {np.mean(latencies)} seconds")
    for percentage, value in zip(PERCENTAGES, percentiles):
        print(f"{percentage}% percentile latency: {value} seconds")
    result = {"avg_latency": float(np.mean(latencies)), "latencies": latencies.tolist(),
              "percentiles": dict(zip(PERCENTAGES, percentiles.tolist()))}
    if output_json:
        with open(output_json, "w") as f:
            json.dump(result, f, indent=4)
    return result
