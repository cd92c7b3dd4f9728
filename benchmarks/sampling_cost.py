"""What the per-request logits processors cost: W1 with plain sampling, then with every row using
penalties (repetition, presence, frequency) and a logit bias, then with half the rows using them.
One engine, one JSON line per variant (output tok/s). Plain rows must pay nothing for the feature.

    python benchmarks/sampling_cost.py MODEL_DIR [--num-requests N]   (MODEL_DIR: the Qwen3-0.6B config)
"""
import argparse
import json
import time

from pagedllm import LLM, SamplingParams
from pagedllm.bench.workloads import build

PENALISED = dict(repetition_penalty=1.1, presence_penalty=0.2, frequency_penalty=0.2,
                 logit_bias={11: 2.0, 13: -2.0})


def _params(k: int, penalised: bool) -> SamplingParams:
    return SamplingParams(temperature=1.0, ignore_eos=True, max_tokens=k, **(PENALISED if penalised else {}))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--num-requests", type=int, default=256)
    args = parser.parse_args()
    w = build("W1")
    prompts, lens = w.prompts[:args.num_requests], w.output_lens[:args.num_requests]
    llm = LLM(args.model, load_format="dummy", max_model_len=4096, log_stats_interval=0)
    llm.generate([list(range(1, 9))], _params(4, True), use_tqdm=False)   # warm-up, processors included
    for variant, every in (("plain", 0), ("all penalised", 1), ("half penalised", 2), ("plain again", 0)):
        params = [_params(k, every > 0 and i % every == 0) for i, k in enumerate(lens)]
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        num_out = sum(len(o.outputs[0].token_ids) for o in outs)
        print(json.dumps({"variant": variant, "output_tok_s": round(num_out / seconds, 1),
                          "seconds": round(seconds, 3)}), flush=True)


if __name__ == "__main__":
    main()
