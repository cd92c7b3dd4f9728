"""`vllm bench serve`'s flags on `pagedllm bench serve`, taken as vLLM 0.26 takes them, or refused naming the flag.

vLLM picks its prompts with --dataset-name (default random); here only random is built (the workloads of
shared/benchmarks.md come by --workload), so the other datasets, which read files or the Hugging Face hub, are
refused rather than quietly replaced by random prompts.
"""
import argparse
import json

VLLM_DATASETS = ("sharegpt", "burstgpt", "sonnet", "random", "random-mm", "random-rerank", "hf", "custom",
                 "custom_audio", "custom_image", "prefix_repetition", "spec_bench", "speed_bench", "timed_trace")
COMPLETION_BACKENDS = ("openai", "vllm")      # vLLM's backends that stream /v1/completions
PERCENTILE_METRICS = ("ttft", "tpot", "itl", "e2el")
SAMPLING_FLAGS = (("temperature", float), ("top_p", float), ("top_k", int), ("min_p", float),
                  ("frequency_penalty", float), ("presence_penalty", float), ("repetition_penalty", float))


def add_dataset_args(parser: argparse.ArgumentParser):
    """vLLM's dataset flags, for bench serve and bench throughput alike (refuse_other_datasets checks them)."""
    parser.add_argument("--dataset-name", default=None, choices=VLLM_DATASETS,
                        help="vLLM's dataset; only random is built here (the default where --workload is not "
                             "given); the others are refused")
    parser.add_argument("--dataset-path", "--dataset", default=None,
                        help="refused: no file or hub dataset is read here")


def refuse_other_datasets(args: argparse.Namespace, command: str):
    """Only random prompts (or --workload) are built: another dataset is refused, naming the flag, rather than
    quietly replaced by random prompts."""
    if args.dataset_name not in (None, "random"):
        raise ValueError(f"--dataset-name {args.dataset_name} is not built in pagedllm bench {command}: use random "
                         f"(vLLM's default) or --workload W1|W2|W3|W4")
    if args.dataset_path is not None:
        raise ValueError(f"--dataset-path {args.dataset_path}: no dataset file is read here (random prompts, or "
                         f"--workload W1|W2|W3|W4)")


def add_vllm_args(parser: argparse.ArgumentParser):
    add_dataset_args(parser)
    parser.add_argument("--input-len", type=int, default=None, help="as --random-input-len (vLLM's general flag)")
    parser.add_argument("--output-len", type=int, default=None, help="as --random-output-len (vLLM's general flag)")
    parser.add_argument("--random-prefix-len", type=int, default=0,
                        help="random: one run of this many random ids before every prompt, on top of its length")
    parser.add_argument("--host", default="127.0.0.1", help="the server's host where --base-url is not given")
    parser.add_argument("--port", type=int, default=8000, help="the server's port where --base-url is not given")
    parser.add_argument("--backend", default="openai", help="openai or vllm (both stream /v1/completions); "
                        "vLLM's others (openai-chat, embeddings, ...) are refused")
    parser.add_argument("--label", default=None, help="the saved result's label and file-name prefix "
                        "(default: --backend)")
    parser.add_argument("--burstiness", type=float, default=1.0,
                        help="arrival gaps gamma-distributed with this shape (1: Poisson); only with a finite "
                             "--request-rate")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="every request here carries ignore_eos already (as vLLM's random dataset forces)")
    parser.add_argument("--disable-tqdm", action="store_true", help="no progress bar is drawn here in any case")
    parser.add_argument("--percentile-metrics", default=None,
                        help="comma-separated of ttft, tpot, itl, e2el (default ttft,tpot,itl): the metrics the "
                             "saved result and the summary give mean, median, std and percentiles of")
    parser.add_argument("--metric-percentiles", default="99", help="comma-separated percentiles (default 99)")
    parser.add_argument("--save-result", action="store_true", help="write vLLM's result JSON to a file")
    parser.add_argument("--append-result", action="store_true", help="append it to the file as a new line")
    parser.add_argument("--save-detailed", action="store_true",
                        help="the result also holds per-request input_lens, output_lens, ttfts, itls, "
                             "start_times, errors")
    parser.add_argument("--result-dir", default=None, help="directory of the result file (made if missing)")
    parser.add_argument("--result-filename", default=None, help="result file name (default: vLLM's "
                        "{label}-{request_rate}qps[-concurrency{N}]-{model}-{date}.json)")
    parser.add_argument("--metadata", nargs="*", default=None, metavar="KEY=VALUE",
                        help="pairs written into the saved result")
    parser.add_argument("--served-model-name", default=None, help="the model's name in the API where --model is a "
                        "path or hub id (vLLM's meaning)")
    parser.add_argument("--extra-body", type=json.loads, default=None, help="JSON object merged into every request")
    for name, kind in SAMPLING_FLAGS:
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                            help=f"sent as {name} in every request (overrides --sampling plain's value)")


def resolve(args: argparse.Namespace):
    """vLLM's flags folded into the ones bench serve runs by; a flag that cannot be honoured is a ValueError
    naming it."""
    refuse_other_datasets(args, "serve")
    if args.dataset_name == "random" and args.workload not in (None, "random"):
        raise ValueError(f"--dataset-name random and --workload {args.workload} name different prompts")
    args.workload = args.workload or "random"   # vLLM's default dataset
    if args.workload != "random" and (args.input_len or args.output_len or args.random_prefix_len):
        raise ValueError(f"--input-len, --output-len and --random-prefix-len are for random prompts, not "
                         f"--workload {args.workload}")
    args.random_input_len = args.input_len or args.random_input_len
    args.random_output_len = args.output_len or args.random_output_len
    if args.backend not in COMPLETION_BACKENDS:
        raise ValueError(f"--backend {args.backend} is not built: {' or '.join(COMPLETION_BACKENDS)} "
                         f"(/v1/completions, streamed)")
    args.base_url = args.base_url or f"http://{_host_port(args.host, args.port)}"
    _check(args.burstiness > 0, "--burstiness", "> 0", args.burstiness)
    _check(args.random_prefix_len >= 0, "--random-prefix-len", ">= 0", args.random_prefix_len)
    args.percentile_metrics = _metrics(args.percentile_metrics or "ttft,tpot,itl")
    args.metric_percentiles = _percentiles(args.metric_percentiles)
    args.metadata = _pairs(args.metadata or [])
    _check(args.extra_body is None or isinstance(args.extra_body, dict), "--extra-body", "a JSON object",
           args.extra_body)
    args.sampling_overrides = {name: getattr(args, name) for name, _ in SAMPLING_FLAGS
                               if getattr(args, name) is not None}


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _metrics(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in PERCENTILE_METRICS]
    _check(names and not unknown, "--percentile-metrics", f"of {', '.join(PERCENTILE_METRICS)}", text)
    return names


def _percentiles(text: str) -> list[float]:
    try:
        values = [float(p) for p in text.split(",")]
    except ValueError:
        values = []
    _check(values and all(0 <= p <= 100 for p in values), "--metric-percentiles",
           "comma-separated numbers in [0, 100]", text)
    return values


def _pairs(items: list[str]) -> dict[str, str]:
    for item in items:
        _check("=" in item, "--metadata", "KEY=VALUE pairs", item)
    return {k.strip(): v.strip() for k, v in (item.split("=", 1) for item in items)}


def _check(ok, name: str, limit: str, value):
    if not ok:
        raise ValueError(f"{name} must be {limit}, got {value!r}")
