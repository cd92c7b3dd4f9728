"""How often bf16 greedy decoding keeps float32's tokens, for pagedllm and for transformers itself.

    python benchmarks/bf16_agreement.py [--model DIR] [--max-tokens 32]

Agreement = tokens before the first divergence from float32-on-CPU greedy, summed over prompts, over all
tokens. transformers' own bf16 agreement on the same GPU is the yardstick: a model whose logits have
near-ties diverges in bf16 whatever the engine. The 8 test prompts decide issue 3's target; one early
divergence there moves the figure by up to 12%, so the 512 broad prompts say whether a change helps at all.
"ceiling" is float32 arithmetic on bf16-rounded weights: what no bf16-weight engine can beat on average.
"""
import argparse
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pagedllm import LLM, SamplingParams
from pagedllm.config import DEMO_MODEL

PROMPTS = ["Once upon a time", "The little dog", "Lily wanted to", "One day, a big", "Tom and Sam went to the",
           "She looked at the sky and", "The cat sat", "There was a"]
_SUBJECTS = ["Once", "The", "Lily", "Tom", "She", "A", "One day", "There", "Mom", "The big", "He", "Sue and Ben", "Tim",
             "The sun", "It was", "Max", "The bird", "Anna", "The little girl", "Ben", "The dog", "A boy", "Sara",
             "The tree", "Dad", "Jack", "The king", "Amy", "The fish", "Sam", "Kitty", "The car"]
_VERBS = ["was", "saw a", "liked to", "went", "had a", "found", "wanted", "said", "looked at", "played with",
          "ran to", "was very", "made a", "did not", "loved", "could"]
BROAD_PROMPTS = [f"{s} {v}" for s in _SUBJECTS for v in _VERBS]


def agreement(ref: list[list[int]], got: list[list[int]], n: int) -> float:
    same = sum(next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
               for x, y in zip(ref, got))
    return same / (n * len(ref))


def hf_greedy(model_dir: str, dtype: torch.dtype, device: str, n: int) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    outs = []
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt").input_ids.to(device)
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        outs.append(out[0, ids.shape[1]:].tolist())
    return outs


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=DEMO_MODEL)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    n = args.max_tokens
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)

    def ours(prompts=PROMPTS, round_weights=False, **kw):
        llm = LLM(args.model, log_stats_interval=0, **kw)
        if round_weights:
            with torch.no_grad():
                for p in llm.engine.runner.model.parameters():
                    p.copy_(p.to(torch.bfloat16).float())
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    ref = ours(device="cpu", dtype="float32")
    broad_ref = ours(BROAD_PROMPTS, device="cpu", dtype="float32")
    report = {
        "pagedllm_fp32_cuda": agreement(ref, ours(device="cuda", dtype="float32"), n),
        "pagedllm_bf16_cuda": agreement(ref, ours(device="cuda", dtype="bfloat16"), n),
        "pagedllm_bf16_cuda_eager": agreement(ref, ours(device="cuda", dtype="bfloat16", enforce_eager=True), n),
        "hf_fp32_cpu": agreement(ref, hf_greedy(args.model, torch.float32, "cpu", n), n),
        "hf_bf16_cuda": agreement(ref, hf_greedy(args.model, torch.bfloat16, "cuda", n), n),
        "broad_pagedllm_bf16_cuda": agreement(broad_ref, ours(BROAD_PROMPTS, device="cuda", dtype="bfloat16"), n),
        "broad_ceiling_cpu": agreement(broad_ref, ours(BROAD_PROMPTS, round_weights=True, device="cpu",
                                                        dtype="float32"), n),
    }
    print(json.dumps({k: round(v, 4) for k, v in report.items()}))


if __name__ == "__main__":
    main()
