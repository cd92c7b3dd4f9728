"""What Qwen3's sampling defaults (temperature 0.6, top_k 20, top_p 0.95: what a server request without
sampling fields gets) cost: top-p within top-k by a sort of the whole vocabulary, or from the k best candidates.

1. The sampler alone on (rows, vocab) float32 logits, ms a call to the sampled ids on the host (median of 50):
   plain sampling (temperature 1), the defaults through the sort, the defaults through the candidates.
   Then torch's topk (k = 20 and 1,024) and one compare-and-count pass on bfloat16 and float32 logits: whether
   taking the candidates from the model's 16-bit logits would pay. Then top-p alone (Llama 3's temperature 0.6,
   top_p 0.9) on peaked and flat rows, from the candidates and by the sort.
2. W1 on one engine: temperature 1 (plain), the defaults with the candidates, the defaults with the sort; top-p
   alone with and without the candidates.
One JSON line each.

    python benchmarks/top_k_top_p_cost.py MODEL_DIR [--num-requests N] [--rows 300]
"""
import argparse
import json
import statistics
import time

import torch
from w1_variants import run_variant, w1_engine

from pagedllm import SamplingParams
from pagedllm.sample import sampler as sampler_module
from pagedllm.sample.sampler import Sampler, SamplingMetadata

DEFAULTS = dict(temperature=0.6, top_k=20, top_p=0.95)
LLAMA = dict(temperature=0.6, top_p=0.9)   # Llama 3.1's generation config: top-p alone


def time_sampler(rows: int, vocab: int, params: SamplingParams, candidates: bool, device: str,
                 scale: float = 3.0) -> float:
    logits = torch.randn(rows, vocab, device=device) * scale
    meta = SamplingMetadata.build([params] * rows, [None] * rows, [[]] * rows, device)
    sampler_module._CANDIDATES_MAX_K = 1024 if candidates else 0
    return time_op(lambda: Sampler()(logits, meta).sampled_token_ids.cpu())


def time_op(fn) -> float:
    """Median ms of fn() to the device's end (50 after 10 warm-ups)."""
    times = []
    for i in range(60):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if i >= 10:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--vocab", type=int, default=151936, help="Qwen3's")
    args, _ = parser.parse_known_args()
    llm, prompts, lens = w1_engine()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    llm.generate(prompts[:8], SamplingParams(max_tokens=8, **DEFAULTS), use_tqdm=False)   # warm-up
    for name, params, candidates in (("plain", SamplingParams(temperature=1.0), True),
                                     ("defaults, sort", SamplingParams(**DEFAULTS), False),
                                     ("defaults, candidates", SamplingParams(**DEFAULTS), True)):
        ms = time_sampler(args.rows, args.vocab, params, candidates, device)
        print(json.dumps({"sampler": name, "rows": args.rows, "vocab": args.vocab, "ms": round(ms, 3)}), flush=True)
    # The candidates' topk on the model's 16-bit logits instead of the float32 copy (would pay if much faster:
    # temperature keeps the order, so the same candidates), and the full passes the filtered path makes.
    for dtype in (torch.bfloat16, torch.float32):
        logits = (torch.randn(args.rows, args.vocab, device=device) * 3).to(dtype)
        for k in (20, 1024):
            print(json.dumps({"topk": k, "dtype": str(dtype)[6:], "ms": round(time_op(lambda: logits.topk(k)), 3)}),
                  flush=True)
        print(json.dumps({"full pass": "x >= x[:, :1] (a compare and count)", "dtype": str(dtype)[6:],
                          "ms": round(time_op(lambda: (logits >= logits[:, :1]).sum(dim=-1)), 3)}), flush=True)
    # Top-p alone (Llama 3's defaults): from the candidates when they hold p of every row (peaked logits, as a
    # trained model's), else the sort (flat logits, as dummy weights': after a miss, 64 calls sort at once).
    for name, scale in (("peaked", 3.0), ("flat", 0.5)):
        logits = torch.randn(args.rows, args.vocab, device=device) * scale / LLAMA["temperature"]
        sampler_module._CANDIDATES_MAX_K = 1024
        top_p = torch.full((args.rows,), LLAMA["top_p"], device=device)
        held = sampler_module._top_p_of_candidates(logits, None, top_p, 1024) is not None
        for candidates in (False, True):
            ms = time_sampler(args.rows, args.vocab, SamplingParams(**LLAMA), candidates, device, scale)
            print(json.dumps({"sampler": f"top_p alone, {name}, {'candidates' if candidates else 'sort'}",
                              "candidates_hold_p": held, "ms": round(ms, 3)}), flush=True)
    for variant, kwargs, candidates in (("plain", dict(temperature=1.0), True),
                                        ("defaults, candidates", DEFAULTS, True),
                                        ("defaults, sort", DEFAULTS, False),
                                        ("defaults, candidates again", DEFAULTS, True),
                                        ("top_p alone, candidates (dummy weights: the sort after them)", LLAMA, True),
                                        ("top_p alone, sort", LLAMA, False)):
        sampler_module._CANDIDATES_MAX_K = 1024 if candidates else 0
        run_variant(llm, variant, prompts, [SamplingParams(ignore_eos=True, max_tokens=k, **kwargs) for k in lens])


if __name__ == "__main__":
    main()
