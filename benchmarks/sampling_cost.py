"""What the per-request logits processors cost: W1 with plain sampling, then with every row using
penalties (repetition, presence, frequency) and a logit bias, then with half the rows using them.
One engine, one JSON line per variant (output tok/s). Plain rows must pay nothing for the feature.

    python benchmarks/sampling_cost.py MODEL_DIR [--num-requests N]   (MODEL_DIR: the Qwen3-0.6B config)
"""
from w1_variants import run_variant, w1_engine

from pagedllm import SamplingParams

PENALISED = dict(repetition_penalty=1.1, presence_penalty=0.2, frequency_penalty=0.2,
                 logit_bias={11: 2.0, 13: -2.0})


def _params(k: int, penalised: bool) -> SamplingParams:
    return SamplingParams(temperature=1.0, ignore_eos=True, max_tokens=k, **(PENALISED if penalised else {}))


def main():
    llm, prompts, lens = w1_engine()
    llm.generate([list(range(1, 9))], _params(4, True), use_tqdm=False)   # warm-up, processors included
    for variant, every in (("plain", 0), ("all penalised", 1), ("half penalised", 2), ("plain again", 0)):
        run_variant(llm, variant, prompts, [_params(k, every > 0 and i % every == 0) for i, k in enumerate(lens)])


if __name__ == "__main__":
    main()
