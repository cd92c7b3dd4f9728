"""`vllm bench serve`'s result: the JSON object --save-result writes (vLLM 0.26's keys) and the summary block it
prints. Here the summary goes to stderr, so stdout stays bench serve's one JSON line."""
import argparse
import json
import os
import sys
from datetime import datetime

import numpy as np

HEADERS = {"ttft": ("TTFT", "Time to First Token"), "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
           "itl": ("ITL", "Inter-token Latency"), "e2el": ("E2EL", "End-to-end Latency")}


def build(args: argparse.Namespace, model_id: str, tokenizer_id: str | None, input_lens: list[int],
          results: list, duration: float) -> dict:
    """results: bench serve's RequestResults in request order; input_lens: each prompt's tokens."""
    ok = [r for r in results if r.ok]
    num_in = sum(n for n, r in zip(input_lens, results) if r.ok)
    num_out = sum(r.num_output_tokens for r in ok)
    result = {"date": datetime.now().strftime("%Y%m%d-%H%M%S"), "endpoint_type": args.backend,
              "backend": args.backend, "label": args.label, "model_id": model_id, "tokenizer_id": tokenizer_id,
              "num_prompts": len(results), **args.metadata,
              "request_rate": args.request_rate if args.request_rate < float("inf") else "inf",
              "burstiness": args.burstiness, "max_concurrency": args.max_concurrency,
              "duration": duration, "completed": len(ok), "failed": len(results) - len(ok),
              "total_input_tokens": num_in, "total_output_tokens": num_out,
              "request_throughput": len(ok) / duration, "request_goodput": None,
              "output_throughput": num_out / duration, "total_token_throughput": (num_in + num_out) / duration,
              **_peaks(ok), "rtfx": 0.0}
    if args.save_detailed:
        result.update(input_lens=input_lens, output_lens=[r.num_output_tokens for r in results],
                      ttfts=[r.ttft for r in results], itls=[r.itls for r in results],
                      start_times=[r.start_time for r in results], errors=[r.error for r in results])
    values = metric_values(ok)
    for name in args.percentile_metrics:
        ms = np.array(values[name] or [0.0]) * 1000   # vLLM's figures of no value: 0
        result.update({f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)),
                       f"std_{name}_ms": float(ms.std())})
        for p in args.metric_percentiles:
            result[f"p{_p_word(p)}_{name}_ms"] = float(np.percentile(ms, p))
    return result


def metric_values(ok: list) -> dict[str, list[float]]:
    """Seconds per metric over the requests that completed: bench serve's own report and vLLM's result read these.
    TPOT: (latency - TTFT) / (output tokens - 1) a request; ITL: every gap between its chunks."""
    return {"ttft": [r.ttft for r in ok], "itl": [x for r in ok for x in r.itls], "e2el": [r.latency for r in ok],
            "tpot": [(r.latency - r.ttft) / (r.num_output_tokens - 1) for r in ok if r.num_output_tokens > 1]}


def _p_word(p: float) -> str:
    return str(int(p)) if int(p) == p else str(p)


def _peaks(ok: list) -> dict:
    """vLLM's max_output_tokens_per_s and max_concurrent_requests: chunks and requests in flight counted in
    one-second buckets from the first request's start."""
    if not ok:
        return {"max_output_tokens_per_s": 0.0, "max_concurrent_requests": 0}
    t0 = min(r.start_time for r in ok)
    buckets = int(np.ceil(max(r.start_time + r.latency for r in ok) - t0)) + 1
    tokens, running = np.zeros(buckets), np.zeros(buckets)
    for r in ok:
        times = np.cumsum([r.start_time + r.ttft, *r.itls]) - t0
        np.add.at(tokens, times[(times >= 0) & (times < buckets)].astype(int), 1)
        running[int(r.start_time - t0):int(r.start_time + r.latency - t0) + 1] += 1
    return {"max_output_tokens_per_s": float(tokens.max()), "max_concurrent_requests": int(running.max())}


def summary(result: dict, args: argparse.Namespace) -> list[str]:
    """vLLM's printed block, its labels and widths."""
    def row(label, value, fmt=""):
        return "{:<40} {:<10{}}".format(label, value, fmt)
    lines = ["{:=^50}".format(" Serving Benchmark Result "), row("Successful requests:", result["completed"]),
             row("Failed requests:", result["failed"])]
    if args.max_concurrency is not None:
        lines.append(row("Maximum request concurrency:", args.max_concurrency))
    if args.request_rate != float("inf"):
        lines.append(row("Request rate configured (RPS):", args.request_rate, ".2f"))
    lines += [row("Benchmark duration (s):", result["duration"], ".2f"),
              row("Total input tokens:", result["total_input_tokens"]),
              row("Total generated tokens:", result["total_output_tokens"]),
              row("Request throughput (req/s):", result["request_throughput"], ".2f"),
              row("Output token throughput (tok/s):", result["output_throughput"], ".2f"),
              row("Peak output token throughput (tok/s):", result["max_output_tokens_per_s"], ".2f"),
              row("Peak concurrent requests:", result["max_concurrent_requests"], ".2f"),
              row("Total token throughput (tok/s):", result["total_token_throughput"], ".2f")]
    for name in ("ttft", "tpot", "itl", "e2el"):
        if name not in args.percentile_metrics:
            continue
        short, header = HEADERS[name]
        lines += ["{:-^50}".format(header), row(f"Mean {short} (ms):", result[f"mean_{name}_ms"], ".2f"),
                  row(f"Median {short} (ms):", result[f"median_{name}_ms"], ".2f")]
        lines += [row(f"P{_p_word(p)} {short} (ms):", result[f"p{_p_word(p)}_{name}_ms"], ".2f")
                  for p in args.metric_percentiles]
    return lines + ["=" * 50]


def print_summary(result: dict, args: argparse.Namespace):
    print("\n".join(summary(result, args)), file=sys.stderr, flush=True)


def file_name(args: argparse.Namespace, model_id: str, date: str) -> str:
    """vLLM's name: {label}-{request_rate}qps[-concurrency{N}]-{model's last path part}-{date}.json, or
    --result-filename; under --result-dir (made if missing)."""
    concurrency = f"-concurrency{args.max_concurrency}" if args.max_concurrency is not None else ""
    name = args.result_filename or (f"{args.label or args.backend}-{args.request_rate}qps{concurrency}-"
                                    f"{model_id.split('/')[-1]}-{date}.json")
    if args.result_dir:
        os.makedirs(args.result_dir, exist_ok=True)
        name = os.path.join(args.result_dir, name)
    return name


def save(result: dict, args: argparse.Namespace, model_id: str) -> str | None:
    if not (args.save_result or args.append_result):
        return None
    path = file_name(args, model_id, result["date"])
    with open(path, "a+" if args.append_result else "w", encoding="utf-8") as f:
        if args.append_result and f.tell() != 0:
            f.write("\n")
        json.dump(result, f)
    return path
