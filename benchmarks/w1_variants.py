"""What the W1 cost scripts share (sampling_cost.py, structured_cost.py): one dummy-weight engine on the
model's config, W1's first N requests, and a timed generate of one variant."""
import argparse
import json
import time

from pagedllm import LLM
from pagedllm.bench.workloads import build


def w1_engine() -> tuple[LLM, list[list[int]], list[int]]:
    """MODEL_DIR [--num-requests N] from the command line: the engine, W1's prompts and output lengths."""
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--num-requests", type=int, default=256)
    args, _ = parser.parse_known_args()   # the caller's own flags (structured_cost.py --reps) pass through
    w = build("W1")
    llm = LLM(args.model, load_format="dummy", max_model_len=4096, log_stats_interval=0)
    return llm, w.prompts[:args.num_requests], w.output_lens[:args.num_requests]


def run_variant(llm: LLM, variant: str, prompts, params, **extra) -> list:
    """Generates, prints one JSON line (output tok/s, seconds, `extra`(outputs) fields) and returns the outputs."""
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    num_out = sum(len(o.outputs[0].token_ids) for o in outs)
    line = {"variant": variant, "output_tok_s": round(num_out / seconds, 1), "seconds": round(seconds, 3)}
    line.update({name: fn(outs) for name, fn in extra.items()})
    print(json.dumps(line), flush=True)
    return outs
