"""Offline throughput on a workload of shared/benchmarks.md; prints one JSON line.

    python benchmarks/throughput.py --workload W1 --model DIR [--limit N] [engine flags]
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402
import workloads  # noqa: E402

from pagedllm import LLM, SamplingParams  # noqa: E402
from pagedllm.cli import add_engine_args, engine_kwargs  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", required=True, choices=["W1", "W2", "W3"])
    parser.add_argument("--limit", type=int, default=None, help="only the first N requests")
    add_engine_args(parser)
    args = parser.parse_args()
    w = workloads.build(args.workload)
    prompts, out_lens = w.prompts[:args.limit], w.output_lens[:args.limit]
    start = time.perf_counter()
    llm = LLM(**engine_kwargs(args))
    startup = time.perf_counter() - start
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4), use_tqdm=False)   # warm-up
    params = [SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=n) for n in out_lens]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    num_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    num_in = sum(len(p) for p in prompts)
    assert num_out == sum(out_lens)
    device = torch.cuda.get_device_name() if llm.engine.device.type == "cuda" else "cpu"
    print(json.dumps({"workload": args.workload, "requests": len(prompts), "output_tok_s": round(num_out / seconds, 1),
                      "total_tok_s": round((num_in + num_out) / seconds, 1), "req_s": round(len(prompts) / seconds, 2),
                      "seconds": round(seconds, 2), "startup_s": round(startup, 2), "device": device,
                      "dtype": str(llm.engine.dtype), "kv_blocks": llm.engine.runner.num_blocks,
                      "preemptions": llm.engine.get_stats().num_preemptions}))


if __name__ == "__main__":
    main()
