"""`vllm bench throughput`'s flags on `pagedllm bench throughput`: vLLM 0.26's random dataset (its default where no
dataset file is given), --n, and its printed lines; what is not built is refused naming the flag.

A vLLM user's line, `--model M --input-len 1024 --output-len 128 --num-prompts 1000`, runs here as there:
random ids, every request generating exactly its output length (ignore_eos, temperature 1.0, top_p 1.0).
"""
import argparse
import sys

from pagedllm.bench.serve_args import add_dataset_args, refuse_other_datasets
from pagedllm.bench.workloads import Workload, random_workload

BACKENDS = ("vllm",)   # vLLM's hf, mii and vllm-chat backends are not built (--engine hf is the paper's baseline)


def add_vllm_args(parser: argparse.ArgumentParser):
    add_dataset_args(parser)
    parser.add_argument("--backend", default="vllm", help="vllm (this engine); vLLM's others are refused")
    parser.add_argument("--input-len", type=int, default=None, help="random: prompt tokens")
    parser.add_argument("--output-len", type=int, default=None, help="random: output tokens (default 128)")
    parser.add_argument("--random-input-len", type=int, default=None, help="random: as --input-len, and wins")
    parser.add_argument("--random-output-len", type=int, default=None, help="random: as --output-len, and wins")
    parser.add_argument("--random-range-ratio", type=float, default=0.0,
                        help="random: lengths uniform in len * [1 - r, 1 + r]")
    parser.add_argument("--random-prefix-len", "--prefix-len", type=int, default=0,
                        help="random: one run of random ids before every prompt")
    parser.add_argument("--num-prompts", type=int, default=None,
                        help="random: how many requests (default 1000); a --workload: its first N")
    parser.add_argument("--n", type=int, default=1, help="outputs per prompt (all of them counted)")
    parser.add_argument("--disable-detokenize", action="store_true", help="outputs are token ids only")


def check(args: argparse.Namespace):
    """Refuses, naming the flag, what cannot be honoured; chooses random where no --workload is given."""
    if args.backend not in BACKENDS:
        raise ValueError(f"--backend {args.backend} is not built: vllm (this engine); --engine hf times "
                         f"transformers generate instead")
    refuse_other_datasets(args, "throughput")
    if args.n < 1 or (args.n > 1 and args.engine == "hf"):
        raise ValueError(f"--n must be >= 1 (1 with --engine hf), got {args.n}")
    if args.workload is not None:
        if args.dataset_name or args.input_len or args.random_input_len:
            raise ValueError(f"--workload {args.workload} and --dataset-name / --input-len name different prompts")
        args.num_requests = args.num_requests or args.num_prompts
        return
    if args.input_len is None and args.random_input_len is None:
        raise ValueError("random prompts need --input-len or --random-input-len (as vLLM), or give --workload")
    args.num_prompts = args.num_prompts or args.num_requests or 1000
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {args.num_prompts}")


def random_requests(args: argparse.Namespace, engine_kwargs: dict) -> Workload:
    input_len = args.random_input_len or args.input_len
    output_len = args.random_output_len or args.output_len or 128
    from pagedllm.bench.serve import vocab_size
    vocab = vocab_size(engine_kwargs.get("tokenizer") or engine_kwargs["model"], "")
    return random_workload(args.num_prompts, input_len, output_len, args.random_range_ratio, engine_kwargs["seed"],
                           vocab, args.random_prefix_len)


def print_vllm_lines(result: dict):
    """vLLM's three lines, on stderr: stdout stays the one JSON line."""
    seconds, tokens = result["elapsed_time"], result["num_input_tokens"] + result["num_output_tokens"]
    print(f"Throughput: {result['num_requests'] / seconds:.2f} requests/s, {tokens / seconds:.2f} total tokens/s, "
          f"{result['num_output_tokens'] / seconds:.2f} output tokens/s\n"
          f"Total num prompt tokens:  {result['num_input_tokens']}\n"
          f"Total num output tokens:  {result['num_output_tokens']}", file=sys.stderr, flush=True)


def vllm_keys(result: dict) -> dict:
    """The keys of vLLM's --output-json file."""
    seconds, tokens = result["elapsed_time"], result["num_input_tokens"] + result["num_output_tokens"]
    return {"elapsed_time": seconds, "num_requests": result["num_requests"], "total_num_tokens": tokens,
            "requests_per_second": result["num_requests"] / seconds, "tokens_per_second": tokens / seconds}
