"""vLLM 0.26 on the workloads of pagedllm/bench/workloads.py: the other half of a side-by-side (FP8 settings for
issue 18, W4 / W4-prefill for issue 17). Run on the GPU machine with the vllm-kit's site tree on PYTHONPATH, see
shared/vllm-kit.

usage: vllm_offline.py W4-prefill[,W4...] MODEL_DIR [--quantization fp8] [--kv-cache-dtype fp8] [--max-model-len N]
Several workloads share one engine (one start-up); the prefix cache is reset before each, so W4 after W4-prefill
(the same prompts) is served from scratch. Prints one JSON line a workload, as `pagedllm bench throughput` does.
"""
import argparse
import json
import time

t0 = time.perf_counter()
from vllm import LLM, SamplingParams          # noqa: E402
from vllm.inputs import TokensPrompt          # noqa: E402

from pagedllm.bench.workloads import build    # noqa: E402  (numpy only: no torch device code)

ap = argparse.ArgumentParser()
ap.add_argument("workload")
ap.add_argument("model")
ap.add_argument("--quantization", default=None)
ap.add_argument("--kv-cache-dtype", default="auto")
ap.add_argument("--max-model-len", type=int, default=4096)
args = ap.parse_args()

llm = LLM(model=args.model, load_format="dummy", seed=0, gpu_memory_utilization=0.90,
          max_model_len=args.max_model_len, skip_tokenizer_init=True, quantization=args.quantization,
          kv_cache_dtype=args.kv_cache_dtype)
startup = time.perf_counter() - t0
llm.generate([TokensPrompt(prompt_token_ids=[7, 8, 9])], SamplingParams(max_tokens=8, detokenize=False),
             use_tqdm=False)
for name in args.workload.split(","):
    w = build(name)
    params = [SamplingParams(temperature=1.0, top_p=1.0, max_tokens=n, ignore_eos=True, detokenize=False)
              for n in w.output_lens]
    llm.reset_prefix_cache()
    start = time.perf_counter()
    res = llm.generate([TokensPrompt(prompt_token_ids=p) for p in w.prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    out = sum(len(r.outputs[0].token_ids) for r in res)
    print(json.dumps({"engine": "vllm", "workload": name, "quantization": args.quantization,
                      "kv_cache_dtype": args.kv_cache_dtype, "seconds": round(seconds, 3),
                      "startup_s": round(startup, 1), "output_tok_s": round(out / seconds),
                      "output_tokens": out}), flush=True)
