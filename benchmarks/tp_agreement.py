"""How closely tensor-parallel bf16 keeps TP=1 bf16's greedy tokens (pagedllm/bench/agreement.py's two measures,
TP=1 as the reference): one JSON line. The split changes only the order of the partial sums (o_proj, down_proj,
the logits' columns), so flips should sit at near-ties.

    python benchmarks/tp_agreement.py --model DIR --tensor-parallel-size 2 [--load-format dummy] [--num-prompts 512]
"""
import argparse
import gc
import json

import torch

from pagedllm import LLM
from pagedllm.bench.agreement import (BROAD_PROMPTS, NEAR_TIE, PROMPTS, forced_positions, free_running, greedy,
                                      teacher_forced, token_ids)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--tensor-parallel-size", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--num-prompts", type=int, default=len(PROMPTS))
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=None)
    args = parser.parse_args()
    prompts = (PROMPTS + BROAD_PROMPTS)[:args.num_prompts]
    kw = dict(dtype=args.dtype, load_format=args.load_format, max_model_len=args.max_model_len, log_stats_interval=0)
    ref_llm = LLM(args.model, **kw)
    ref = greedy(ref_llm, prompts, args.max_tokens)
    ref_positions = forced_positions(ref_llm, ref)
    del ref_llm
    gc.collect()
    torch.cuda.empty_cache()
    tp_llm = LLM(args.model, tensor_parallel_size=args.tensor_parallel_size, **kw)
    got = greedy(tp_llm, prompts, args.max_tokens)
    forced = teacher_forced(ref, ref_positions, forced_positions(tp_llm, ref))
    tp_llm.shutdown()
    print(json.dumps({"model": args.model, "tensor_parallel_size": args.tensor_parallel_size, "dtype": args.dtype,
                      "prompts": len(prompts), "tokens": args.max_tokens,
                      "free_running": round(free_running(token_ids(ref), token_ids(got)), 4),
                      "teacher_forced": round(forced.share, 4), "logprob_error": round(forced.logprob_error, 5),
                      "flips": len(forced.gaps), "flips_past_near_tie": sum(g >= NEAR_TIE for g in forced.gaps)}))


if __name__ == "__main__":
    main()
