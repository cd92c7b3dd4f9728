"""CPU cost of the API process per streamed token, with the engine core made cheap so the API process is the
bottleneck (as on a GPU at W1 16 requests/s: ~60 streams, a step every ~2.3 ms).

Starts `pagedllm serve MODEL --load-format dummy`, keeps --concurrency streaming /v1/completions requests
(token-id prompts, or text with --text-prompts; ignore_eos, include_usage) open until --num-requests have
finished, and reads the API process's CPU time (/proc) around the run. Prints one JSON line: API CPU µs per
streamed token and per chunk, its CPU use (1.0 = a saturated core), tokens per chunk (> 1 when the API process
falls behind and merges steps), the time to the first chunk (p50, p99). --py-spy FILE also records a profile
of the API process over the run (speedscope or raw by suffix).

    python benchmarks/api_cost.py .bench/tiny-qwen3 [--concurrency 60 --num-requests 240 --max-tokens 256]
    python benchmarks/api_cost.py QWEN3_CONFIG_DIR --fake-core 15 --concurrency 300 --num-requests 300 \
        --prompt-len 512 --max-tokens 128      # the API process alone at a GPU's event rate

--serve-args '--api-server-count N': N API processes; the CPU figures are then their sum (api_cpu_use 1.0 = one
core's worth).

--fake-core STEP_MS: the engine core is benchmarks/fake_core.py's (no model: one token per request every
STEP_MS, 0 = as fast as it can), so any model directory with a tokenizer and config.json will do. The
client then also reports the gaps between chunks (ITL, ms) and tokens per chunk, as bench serve does.

MODEL: a tiny random model with a real tokenizer, e.g. Qwen3-0.6B's tokenizer files and config.json with
hidden_size 64, intermediate_size 128, 2 layers, 4 heads, 2 KV heads, head_dim 16. On a small CPU the full
151,936-token output head and the temperature-1 draw over it take ~0.3 s a step; with "vocab_size": 16384 in
config.json (the tokenizer stays whole; outputs are the first 16k ids) the core keeps ~1,500 tokens/s going.
The server's core runs with OMP_NUM_THREADS=1 so that it does not spin against the API process.
"""
import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request

import numpy as np


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])   # utime + stime
    return total / os.sysconf("SC_CLK_TCK")


def api_pids(server_pid: int) -> list[int]:
    """The API processes: the server itself, or with --api-server-count N > 1 its spawned children but the
    first (the engine core, spawned before them)."""
    children = []
    for stat in os.listdir("/proc"):
        try:
            text = open(f"/proc/{stat}/stat").read()
            cmdline = open(f"/proc/{stat}/cmdline", "rb").read()
        except (OSError, NotADirectoryError):
            continue
        if int(text.rsplit(")", 1)[1].split()[1]) == server_pid and b"spawn_main" in cmdline:
            children.append(int(stat))
    return sorted(children)[1:] if len(children) > 1 else [server_pid]


def make_prompts(args) -> list:
    """Random token ids; with --text-prompts, decoded to text as vLLM's random dataset sends them."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 10000, size=args.prompt_len).tolist() for _ in range(args.num_requests)]
    if not args.text_prompts:
        return prompts
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    return [tokenizer.decode(p) for p in prompts]


async def load(args) -> tuple[int, int, int, list, list]:
    """Returns (completion tokens, chunks with a choice, failed requests, gaps between a stream's chunks,
    times to the first chunk)."""
    import aiohttp
    totals = [0, 0, 0]
    pending = iter(make_prompts(args))
    gaps, ttfts = [], []

    async def worker(s):
        for prompt in pending:
            body = {"model": "model", "prompt": prompt, "max_tokens": args.max_tokens, "temperature": args.temperature,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            start = time.perf_counter()
            async with s.post("/v1/completions", json=body) as r:
                usage, last = None, None
                async for line in r.content:   # light parsing: the client shares the machine
                    if line.startswith(b'data: {"id"'):
                        if b'"usage"' in line:
                            usage = json.loads(line[6:])["usage"]
                        else:
                            totals[1] += 1
                            now = time.perf_counter()
                            if last is not None:
                                gaps.append(now - last)
                            else:
                                ttfts.append(now - start)
                            last = now
                if r.status != 200 or usage is None:
                    totals[2] += 1
                else:
                    totals[0] += usage["completion_tokens"]

    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(args.base_url, connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as s:
        await asyncio.gather(*(worker(s) for _ in range(args.concurrency)))
    return (*totals, gaps, ttfts)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--concurrency", type=int, default=60)
    p.add_argument("--num-requests", type=int, default=240)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--text-prompts", action="store_true", help="send the prompts as text (vLLM's client does)")
    p.add_argument("--py-spy", default=None, help="record the API process into this file")
    p.add_argument("--py-spy-rate", type=int, default=250)
    p.add_argument("--fake-core", type=float, default=None, metavar="STEP_MS",
                   help="serve with benchmarks/fake_core.py's engine core, a step every STEP_MS")
    p.add_argument("--serve-args", default="", help="more serve flags (e.g. '--stream-interval 4')")
    args = p.parse_args()
    args.base_url = f"http://127.0.0.1:{args.port}"
    main_args = (["-m", "pagedllm.cli"] if args.fake_core is None else
                 [os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_core.py")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FAKE_STEP_MS": str(args.fake_core or 0)}   # no OpenMP spinning
    server = subprocess.Popen([sys.executable, *main_args, "serve", args.model, "--port", str(args.port),
                               "--served-model-name", "model", "--log-level", "warning", "--load-format", "dummy",
                               "--max-model-len", "4096", "--log-stats-interval", "0", *args.serve_args.split()],
                              env=env)
    spy = None
    try:
        while True:
            try:
                urllib.request.urlopen(f"{args.base_url}/health")
                break
            except OSError:
                if server.poll() is not None:
                    sys.exit("the server exited")
                time.sleep(0.5)
        warm = argparse.Namespace(**{**vars(args), "num_requests": 8, "concurrency": 8, "max_tokens": 32})
        asyncio.run(load(warm))
        if args.py_spy:
            fmt = "speedscope" if args.py_spy.endswith(".json") else "raw"
            # --native (PYSPY_NATIVE=1) pauses the process for each sample: exact, but it slows the process down.
            mode = ["--native"] if os.environ.get("PYSPY_NATIVE") else ["--nonblocking"]
            spy = subprocess.Popen(["py-spy", "record", "--pid", str(server.pid), "--rate", str(args.py_spy_rate),
                                    "--format", fmt, "--output", args.py_spy, *mode],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)
        pids = api_pids(server.pid)
        cpu0, t0 = cpu_seconds(pids), time.perf_counter()
        tokens, chunks, failed, gaps, ttfts = asyncio.run(load(args))
        cpu, wall = cpu_seconds(pids) - cpu0, time.perf_counter() - t0
    finally:
        if spy is not None:
            spy.send_signal(2)
            spy.wait()
        server.terminate()
        server.wait()
    print(json.dumps({"requests": args.num_requests, "failed": failed, "concurrency": args.concurrency,
                      "api_processes": len(pids),
                      "tokens": tokens, "chunks": chunks, "wall_s": round(wall, 2),
                      "tok_s": round(tokens / wall), "api_cpu_s": round(cpu, 2), "api_cpu_use": round(cpu / wall, 2),
                      "api_us_per_token": round(cpu / tokens * 1e6, 1),
                      "api_us_per_chunk": round(cpu / chunks * 1e6, 1),
                      "tokens_per_chunk": round(tokens / chunks, 2), **_gap_stats(gaps),
                      "ttft_ms_p50": round(float(np.percentile(ttfts, 50)) * 1e3, 1),
                      "ttft_ms_p99": round(float(np.percentile(ttfts, 99)) * 1e3, 1)}))


def _gap_stats(gaps: list[float]) -> dict:
    ms = np.array(gaps or [np.nan]) * 1e3
    return {"itl_ms_mean": round(float(ms.mean()), 2), "itl_ms_p50": round(float(np.percentile(ms, 50)), 2),
            "itl_ms_p99": round(float(np.percentile(ms, 99)), 2)}


if __name__ == "__main__":
    main()
