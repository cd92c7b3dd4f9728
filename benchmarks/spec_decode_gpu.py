"""Speculative decoding on one GPU, dummy weights: W5-shaped latency and the batch sizes where it stops paying.

    python benchmarks/spec_decode_gpu.py TARGET_DIR DRAFT_DIR [--k 4]

1. W5-shaped (shared/benchmarks.md: one 1,000-id prompt, 512 out, three runs with the last id replaced by the
   run's index, median / 512): ms per output token without speculation, then with the draft model at synthetic
   acceptance 0.8 a position given the one before (vLLM's unconditional 0.8, 0.64, 0.512, 0.4096), then at 0.
2. The policy's sweep: batches of 1..32 such prompts, 256 out, without speculation and with it forced on at
   synthetic 0.8: output tok/s of each, so the batch size where speculation stops paying is measured.
One JSON line per figure. The engines run one after the other (each takes the GPU's memory).
"""
import argparse
import gc
import json
import statistics
import time

import numpy as np
import torch

from pagedllm import LLM, SamplingParams

RATES = [0.8, 0.64, 0.512, 0.4096]
SWEEP = [1, 2, 4, 8, 16, 32]


def w5_prompt(index: int) -> list[int]:
    prompt = np.random.default_rng(1).integers(0, 10000, size=1000).tolist()
    return prompt[:-1] + [index]


def timed(llm: LLM, prompts: list[list[int]], max_tokens: int) -> tuple[float, int]:
    start = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                        use_tqdm=False)
    return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outs)


def w5(llm: LLM, label: str, seed: int):
    times = [timed(llm, [w5_prompt(seed * 3 + i)], 512)[0] for i in range(3)]
    sd = llm.engine.get_stats().spec_decode
    print(json.dumps({"figure": "W5", "run": label, "ms_per_token": round(statistics.median(times) / 512 * 1e3, 3),
                      "runs_s": [round(t, 3) for t in times],
                      "mean_acceptance_length": sd and round(sd.mean_acceptance_length, 3),
                      "drafts": sd and sd.num_drafts}), flush=True)


def sweep(llm: LLM, label: str):
    for b in SWEEP:
        prompts = [w5_prompt(100 + b * 40 + i) for i in range(b)]
        seconds, num = timed(llm, prompts, 256)
        print(json.dumps({"figure": "sweep", "run": label, "batch": b, "output_tok_s": round(num / seconds, 1),
                          "ms_per_step_token": round(seconds / 256 * 1e3, 3)}), flush=True)


def engine(target: str, spec: dict | None) -> LLM:
    start = time.perf_counter()
    llm = LLM(target, load_format="dummy", max_model_len=4096, log_stats_interval=0, skip_tokenizer_init=True,
              speculative_config=spec)
    print(json.dumps({"figure": "startup", "spec": spec is not None, "seconds": round(time.perf_counter() - start, 1)}),
          flush=True)
    timed(llm, [w5_prompt(999)], 32)   # warm-up
    return llm


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("target")
    parser.add_argument("draft")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--no-sweep", action="store_true", help="W5 figures only")
    parser.add_argument("--runs", default="off,0.8,0", help="which W5 runs: off, 0.8, 0 (synthetic acceptance)")
    args = parser.parse_args()
    runs = args.runs.split(",")
    if "off" in runs:
        llm = engine(args.target, None)
        w5(llm, "off", 0)
        if not args.no_sweep:
            sweep(llm, "off")
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    spec = {"method": "draft_model", "model": args.draft, "num_speculative_tokens": args.k,
            "rejection_sample_method": "synthetic", "synthetic_acceptance_rates": RATES[:args.k]}
    llm = engine(args.target, spec)
    if "0.8" in runs:
        w5(llm, "draft_synthetic_0.8", 1)
    runner, speculator = llm.engine.core.runner, llm.engine.core.speculator
    rates = runner.spec_rates
    if "0" in runs:
        runner.spec_rates = [0.0] * args.k
        w5(llm, "draft_synthetic_0", 2)
        runner.spec_rates = rates
    if args.no_sweep:
        return
    speculator.config.disable_by_batch_size, speculator.config.max_step_tokens = 1024, 1 << 20   # forced on
    sweep(llm, "draft_synthetic_0.8_forced")


if __name__ == "__main__":
    main()
