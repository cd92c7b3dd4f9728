"""How closely bf16 keeps float32's greedy tokens, for pagedllm and for transformers itself.

    python benchmarks/bf16_agreement.py [--model DIR] [--max-tokens 32]

Two measures (pagedllm/bench/agreement.py): free-running (tokens before the first divergence from
float32-on-CPU greedy) and teacher-forced (each position predicted from float32's own prefix; with the
largest float32 logprob gap at a flip). transformers' own bf16 free-running figure is the yardstick: a
model whose logits have near-ties diverges in bf16 whatever the engine. The 8 test prompts decide issue 3's
target; one early divergence there moves the free-running figure by up to 12%, so the 512 broad prompts say
whether a change helps at all. "ceiling" is float32 arithmetic on bf16-rounded weights.
"""
import argparse
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pagedllm import LLM
from pagedllm.bench.agreement import (BROAD_PROMPTS, PROMPTS, forced_positions, free_running, greedy,
                                      hf_forced_positions, teacher_forced, token_ids)
from pagedllm.config import DEMO_MODEL


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
    parser.add_argument("--device", default="cuda", help="where the engines under test run (cpu: a dry run)")
    args = parser.parse_args()
    n, dev = args.max_tokens, args.device

    def engine(round_weights=False, **kw):
        # a small fixed cache: several engines share the GPU, and a cache of the free memory would not let them
        llm = LLM(args.model, log_stats_interval=0, num_gpu_blocks_override=2048, **kw)
        if round_weights:
            with torch.no_grad():
                for p in llm.engine.runner.model.parameters():
                    p.copy_(p.to(torch.bfloat16).float())
        return llm

    fp32_cpu = engine(device="cpu", dtype="float32")
    bf16 = engine(device=dev, dtype="bfloat16")
    report = {"device": torch.cuda.get_device_name() if dev == "cuda" else dev}
    for name, prompts in (("", PROMPTS), ("broad_", BROAD_PROMPTS)):
        ref = greedy(fp32_cpu, prompts, n)
        ref_ids = token_ids(ref)

        def free(llm):
            return free_running(ref_ids, token_ids(greedy(llm, prompts, n)))
        ref_positions = forced_positions(fp32_cpu, ref)
        report[f"{name}pagedllm_bf16"] = free(bf16)
        for who, positions in (("pagedllm", forced_positions(bf16, ref)),
                               ("hf", hf_forced_positions(args.model, torch.bfloat16, dev, ref))):
            forced = teacher_forced(ref, ref_positions, positions)
            report |= {f"{name}{who}_bf16_forced": forced.share, f"{name}{who}_bf16_forced_flips": len(forced.gaps),
                       f"{name}{who}_bf16_forced_max_gap": max(forced.gaps, default=0.0),
                       f"{name}{who}_bf16_logprob_error": forced.logprob_error}
        if not name:
            report |= {"pagedllm_fp32": free(engine(device=dev, dtype="float32")),
                       "pagedllm_bf16_eager": free(engine(device=dev, dtype="bfloat16", enforce_eager=True)),
                       "hf_fp32_cpu_same": hf_greedy(args.model, torch.float32, "cpu", n) == ref_ids,
                       "hf_bf16": free_running(ref_ids, hf_greedy(args.model, torch.bfloat16, dev, n))}
        else:
            report["broad_ceiling_cpu"] = free(engine(round_weights=True, device="cpu", dtype="float32"))
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in report.items()}))


if __name__ == "__main__":
    main()
