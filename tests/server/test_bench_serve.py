"""`pagedllm bench serve` against the test server: every request completes with exactly its output length,
and the one JSON line holds the throughput and the TTFT/TPOT/ITL statistics."""
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from pagedllm import cli
from pagedllm.bench import serve as bench_serve


@pytest.mark.parametrize("rate,concurrency", [("inf", "3"), ("40", None)])
def test_bench_serve_one_json_line(server, monkeypatch, capsys, rate, concurrency):
    # A small workload in the tiny model's vocabulary (W1/W2 use ids up to 10,000; their builder is tested
    # against the checksums in tests/unit/test_workloads.py).
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 500, size=int(k)).tolist() for k in rng.integers(4, 40, size=10)]
    out_lens = [int(x) for x in rng.integers(4, 16, size=10)]
    monkeypatch.setattr(bench_serve, "build", lambda name: SimpleNamespace(
        name=name, prompts=prompts, output_lens=out_lens))
    argv = ["bench", "serve", "--base-url", server.url, "--workload", "W1", "--request-rate", rate,
            "--api-key", server.api_key] + (["--max-concurrency", concurrency] if concurrency else [])
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert report["completed"] == 10 and report["failed"] == 0, report
    assert report["output_tokens"] == sum(out_lens)          # ignore_eos: exactly max_tokens each
    assert report["output_tok_s"] > 0 and report["req_s"] > 0
    for name in ("ttft", "tpot", "itl"):
        mean, p50, p99 = (report[f"{name}_ms_{s}"] for s in ("mean", "p50", "p99"))
        assert all(math.isfinite(v) and v > 0 for v in (mean, p50, p99)), report
        assert p50 <= p99
