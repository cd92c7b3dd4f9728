"""Serving benchmark against any OpenAI-compatible server; prints one JSON line.

    pagedllm bench serve --base-url http://127.0.0.1:8000 --workload W1 --request-rate 16 [--max-concurrency 64]
    pagedllm bench serve --workload random --random-input-len 512 --random-output-len 128 --num-prompts 300

Each request of the workload (shared/benchmarks.md) goes to /v1/completions as token ids, streamed, with
temperature 1.0, top_p 1.0 and ignore_eos, so it generates exactly its output length. What vLLM's client
sends instead: `--prompt-format text` (the ids made text through the server's /detokenize before the timer)
and `--sampling server` (no sampling fields: the server's defaults, a model's generation config, apply).
Arrivals are a Poisson process at --request-rate (inf: all at once; --burstiness: gamma gaps, as vLLM's);
--max-concurrency bounds the requests in flight. vLLM's own flags (--dataset-name random, --input-len, --host,
--port, --temperature, ..., --save-result and its file) are bench/serve_args.py's; vLLM's summary block goes to
stderr and its result file is bench/serve_result.py's.
TTFT: send to the first chunk with a choice; ITL: gaps between consecutive such chunks of a request, as vLLM's
client counts them (a chunk that carries several tokens is one gap); TPOT: (latency - TTFT) / (output tokens -
1) per request; output tokens are the server's usage counts. Tokens per chunk: all output tokens / all chunks
with a choice (mean), and the largest and 99th percentile of that ratio per request (a stream's chunks are not
counted one by one: that would need logprobs).
"""
import argparse
import asyncio
import json
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np

from pagedllm.bench import serve_args, serve_result
from pagedllm.bench.schemas import RUN_ON_SCHEMAS
from pagedllm.bench.workloads import WORKLOADS, build, random_workload


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    latency: float = 0.0
    itls: list[float] = field(default_factory=list)
    num_output_tokens: int = 0
    num_prompt_tokens: int = 0   # the server's usage count (0: none came)
    num_chunks: int = 0          # chunks with a choice
    start_time: float = 0.0      # perf_counter at send


def add_cli_args(parser: argparse.ArgumentParser):
    parser.add_argument("--base-url", default=None, help="the server (default: http://{--host}:{--port})")
    parser.add_argument("--endpoint", default="/v1/completions")
    parser.add_argument("--model", default=None, help="model name in the API (default: the server's first)")
    parser.add_argument("--workload", default=None, choices=(*WORKLOADS, "random"),
                        help="a workload of shared/benchmarks.md, or random (vLLM's random dataset: --random-*; "
                             "the default, as vLLM's --dataset-name)")
    parser.add_argument("--num-requests", "--num-prompts", type=int, default=None,
                        help="only the first N requests (quick runs); random: how many (default 1000)")
    parser.add_argument("--random-input-len", type=int, default=1024, help="random: prompt tokens")
    parser.add_argument("--random-output-len", type=int, default=128, help="random: output tokens")
    parser.add_argument("--tokenizer", default=None,
                        help="random: ids below this tokenizer's vocabulary size where it is under 10,000 "
                             "(default: the model's, where its API name is a local folder)")
    parser.add_argument("--random-range-ratio", type=float, default=0.0,
                        help="random: lengths uniform in len * [1 - r, 1 + r] (0: exactly len)")
    parser.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf = all")
    parser.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrival times (and of the random workload)")
    parser.add_argument("--json-schemas", action="store_true",
                        help="constrain request i by JSON schema i %% 8 of bench/schemas.py (vLLM's "
                             "structured_outputs field; answers can run to their max_tokens)")
    parser.add_argument("--sampling", default="plain", choices=("plain", "server"),
                        help="plain: temperature 1.0 and top_p 1.0 in every request; server: no sampling fields, "
                             "so the server's defaults apply (vLLM's client sends none)")
    parser.add_argument("--prompt-format", default="ids", choices=("ids", "text"),
                        help="text: each prompt's ids detokenized by the server before the timer, sent as text "
                             "(vLLM's client sends text); the server tokenizes them again")
    parser.add_argument("--api-key", default=os.environ.get("PAGEDLLM_API_KEY") or os.environ.get("OPENAI_API_KEY"))
    serve_args.add_vllm_args(parser)


def main(args: argparse.Namespace):
    """The CLI's bench serve: bad options and an unreachable server are errors naming them (ValueError, which
    the CLI prints), not tracebacks."""
    import aiohttp
    serve_args.resolve(args)
    for name, ok, limit in (("num_requests", args.num_requests is None or args.num_requests >= 1, ">= 1"),
                            ("max_concurrency", args.max_concurrency is None or args.max_concurrency >= 1, ">= 1"),
                            ("request_rate", args.request_rate > 0, "> 0 requests/s (inf: all at once)"),
                            ("random_input_len", args.random_input_len >= 1, ">= 1"),
                            ("random_output_len", args.random_output_len >= 1, ">= 1"),
                            ("random_range_ratio", 0 <= args.random_range_ratio < 1, "in [0, 1)")):
        if not ok:
            raise ValueError(f"--{name.replace('_', '-')} must be {limit}, got {getattr(args, name)}")
    try:
        report = asyncio.run(run(args))
    except aiohttp.ClientConnectorError as e:
        raise ValueError(f"no server answers at --base-url {args.base_url}: {e}") from e
    except aiohttp.ClientResponseError as e:
        raise ValueError(f"the server at {args.base_url} refused a request: {e.status} {e.message} "
                         f"({e.request_info.url})") from e
    print(json.dumps(_json_safe(report), allow_nan=False))


def _json_safe(value):
    """The report with NaN and infinities (a figure of no request, e.g. every one failed) as null: json.dumps
    would write a bare NaN, which is not JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


async def run(args: argparse.Namespace) -> dict:
    import aiohttp
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    connector = aiohttp.TCPConnector(limit=args.max_concurrency or 0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(args.base_url, connector=connector, timeout=timeout, headers=headers) as s:
        model = args.served_model_name or args.model or await _first_model(s)
        w = _workload(args, args.model or model)
        prompts, out_lens = w.prompts[:args.num_requests], w.output_lens[:args.num_requests]
        input_lens = [len(p) for p in prompts]
        await _request(s, args.endpoint, model, [1, 2, 3], 4)   # warm-up
        if args.prompt_format == "text":
            prompts = await asyncio.gather(*(_detokenize(s, model, p) for p in prompts))
        start = time.perf_counter()
        results = await _send_all(s, args, model, prompts, out_lens)
        duration = time.perf_counter() - start
    _vllm_result(args, args.model or model, input_lens, results, duration)
    return _report(args, w.name, model, prompts, results, duration)


def _vllm_result(args, model_id: str, input_lens: list[int], results: list[RequestResult], duration: float):
    """vLLM's summary block (stderr) and, with --save-result, its result file."""
    input_lens = [r.num_prompt_tokens or n for n, r in zip(input_lens, results)]   # text: the server's count
    result = serve_result.build(args, model_id, args.tokenizer or model_id, input_lens, results, duration)
    serve_result.print_summary(result, args)
    serve_result.save(result, args, model_id)


def _workload(args: argparse.Namespace, model: str):
    if args.workload != "random":
        return build(args.workload)
    return random_workload(args.num_requests or 1000, args.random_input_len, args.random_output_len,
                           args.random_range_ratio, args.seed, vocab_size(args.tokenizer, model),
                           args.random_prefix_len)


def vocab_size(tokenizer: str | None, model: str) -> int | None:
    """The vocabulary of --tokenizer, else of the model where its API name is a local folder (pagedllm serve
    DIR names it DIR); None: unknown."""
    source = tokenizer or (model if os.path.isdir(model) else None)
    if source is None:
        return None
    from transformers import AutoTokenizer
    try:
        return len(AutoTokenizer.from_pretrained(source))
    except (OSError, ValueError) as e:
        if tokenizer is None:      # a folder without a tokenizer: the ids as before
            return None
        raise ValueError(f"--tokenizer {tokenizer!r} does not load: {e}") from e


async def _detokenize(s, model: str, ids: list[int]) -> str:
    async with s.post("/detokenize", json={"model": model, "tokens": ids}) as r:
        r.raise_for_status()
        return (await r.json())["prompt"]


async def _first_model(s) -> str:
    async with s.get("/v1/models") as r:
        r.raise_for_status()
        return (await r.json())["data"][0]["id"]


async def _send_all(s, args, model, prompts, out_lens) -> list[RequestResult]:
    rng = np.random.default_rng(args.seed)
    limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

    sampling = {**(PLAIN_SAMPLING if args.sampling == "plain" else {}), **args.sampling_overrides}

    async def one(prompt, out_len, extra):
        if limit is None:
            return await _request(s, args.endpoint, model, prompt, out_len, extra, sampling)
        async with limit:
            return await _request(s, args.endpoint, model, prompt, out_len, extra, sampling)

    tasks = []
    for i, (prompt, out_len) in enumerate(zip(prompts, out_lens)):
        extra = {"structured_outputs": {"json": RUN_ON_SCHEMAS[i % len(RUN_ON_SCHEMAS)]}} if args.json_schemas else {}
        tasks.append(asyncio.create_task(one(prompt, out_len, {**(args.extra_body or {}), **extra})))
        if args.request_rate != float("inf"):
            await asyncio.sleep(_gap(rng, args.request_rate, args.burstiness))
    return list(await asyncio.gather(*tasks))


def _gap(rng, rate: float, burstiness: float) -> float:
    """vLLM's arrivals: gamma gaps of shape burstiness and mean 1 / rate (burstiness 1: Poisson)."""
    if burstiness == 1.0:
        return rng.exponential(1.0 / rate)
    return rng.gamma(burstiness, 1.0 / (rate * burstiness))


PLAIN_SAMPLING = {"temperature": 1.0, "top_p": 1.0}


async def _request(s, endpoint, model, prompt, max_tokens, extra: dict | None = None,
                   sampling: dict = PLAIN_SAMPLING) -> RequestResult:
    body = request_body(model, prompt, max_tokens, sampling, extra)
    result, num_chunks = RequestResult(), 0
    start = last = result.start_time = time.perf_counter()
    try:
        async with s.post(endpoint, json=body) as r:
            if r.status != 200:
                result.error = f"HTTP {r.status}: {(await r.text())[:200]}"
                return result
            async for line in r.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                now, chunk = time.perf_counter(), json.loads(line[6:])
                if chunk.get("usage"):
                    result.num_output_tokens = chunk["usage"]["completion_tokens"]
                    result.num_prompt_tokens = chunk["usage"].get("prompt_tokens") or 0
                if chunk.get("choices"):
                    if num_chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itls.append(now - last)
                    num_chunks, last = num_chunks + 1, now
        result.latency = time.perf_counter() - start
        result.num_output_tokens = result.num_output_tokens or num_chunks
        result.num_chunks = num_chunks
        result.ok = num_chunks > 0
    except Exception as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


def request_body(model: str, prompt, max_tokens: int, sampling: dict, extra: dict | None = None) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, **sampling, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}, **(extra or {})}


def _report(args, workload: str, model: str, prompts, results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    num_out = sum(r.num_output_tokens for r in ok)
    num_in = sum(r.num_prompt_tokens or len(p) for p, r in zip(prompts, results) if r.ok)   # text: the server's
    values = serve_result.metric_values(ok)
    rate = "inf" if args.request_rate == float("inf") else args.request_rate   # JSON has no infinity
    report = {"workload": workload, "model": model, "json_schemas": args.json_schemas, "base_url": args.base_url,
              "sampling": args.sampling, **({"sampling_overrides": args.sampling_overrides}
                                            if args.sampling_overrides else {}),
              "prompt_format": args.prompt_format,
              "request_rate": rate, "max_concurrency": args.max_concurrency, "requests": len(results),
              "completed": len(ok),
              "failed": len(results) - len(ok), "duration_s": round(duration, 2),
              "req_s": round(len(ok) / duration, 2), "output_tok_s": round(num_out / duration, 1),
              "total_tok_s": round((num_in + num_out) / duration, 1), "output_tokens": num_out}
    for name in ("ttft", "tpot", "itl"):
        ms = np.array(values[name]) * 1000 if values[name] else np.array([np.nan])
        report.update({f"{name}_ms_mean": round(float(ms.mean()), 2),
                       f"{name}_ms_p50": round(float(np.percentile(ms, 50)), 2),
                       f"{name}_ms_p99": round(float(np.percentile(ms, 99)), 2)})
    report["itl_ms_max"] = round(max(values["itl"], default=0.0) * 1000, 2)
    report.update(_chunk_stats(ok))
    if len(ok) < len(results):
        report["first_error"] = next(r.error for r in results if not r.ok)
    return report


def _chunk_stats(ok: list[RequestResult]) -> dict:
    """Tokens per chunk with a choice: over all chunks, and the spread of each request's own mean."""
    chunks = sum(r.num_chunks for r in ok)
    per_request = [r.num_output_tokens / r.num_chunks for r in ok if r.num_chunks]
    if not chunks or not per_request:
        return {"chunks": chunks}
    return {"chunks": chunks, "tokens_per_chunk_mean": round(sum(r.num_output_tokens for r in ok) / chunks, 3),
            "tokens_per_chunk_request_p99": round(float(np.percentile(per_request, 99)), 3),
            "tokens_per_chunk_request_max": round(max(per_request), 3)}
