"""`pagedllm bench serve` against the test server: every request completes with exactly its output length,
and the one JSON line holds the throughput and the TTFT/TPOT/ITL statistics."""
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from pagedllm import cli
from pagedllm.bench import serve as bench_serve


@pytest.mark.parametrize("rate,concurrency,like_vllm", [("inf", "3", False), ("40", None, False), ("inf", None, True)])
def test_bench_serve_one_json_line(server, monkeypatch, capsys, rate, concurrency, like_vllm):
    # A small workload in the tiny model's vocabulary (W1/W2 use ids up to 10,000; their builder is tested
    # against the checksums in tests/unit/test_workloads.py).
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 500, size=int(k)).tolist() for k in rng.integers(4, 40, size=10)]
    out_lens = [int(x) for x in rng.integers(4, 16, size=10)]
    monkeypatch.setattr(bench_serve, "build", lambda name: SimpleNamespace(
        name=name, prompts=prompts, output_lens=out_lens))
    argv = ["bench", "serve", "--base-url", server.url, "--workload", "W1", "--request-rate", rate,
            "--api-key", server.api_key] + (["--max-concurrency", concurrency] if concurrency else [])
    if like_vllm:   # what vLLM's client sends: text prompts, no sampling fields
        argv += ["--prompt-format", "text", "--sampling", "server"]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert report["completed"] == 10 and report["failed"] == 0, report
    assert report["output_tokens"] == sum(out_lens)          # ignore_eos: exactly max_tokens each
    assert report["output_tok_s"] > 0 and report["req_s"] > 0
    assert (report["sampling"], report["prompt_format"]) == (("server", "text") if like_vllm else ("plain", "ids"))
    for name in ("ttft", "tpot", "itl"):
        mean, p50, p99 = (report[f"{name}_ms_{s}"] for s in ("mean", "p50", "p99"))
        assert all(math.isfinite(v) and v > 0 for v in (mean, p50, p99)), report
        assert p50 <= p99


def test_random_workload_in_the_served_models_vocabulary(server, tiny_model_dirs, capsys):
    """--workload random against a model of 512 tokens, its tokenizer named (vLLM's --tokenizer): the ids stay
    below 512; they went to 10,000, and the server refused every request (completed 0)."""
    argv = ["bench", "serve", "--base-url", server.url, "--workload", "random", "--num-requests", "4",
            "--random-input-len", "12", "--random-output-len", "3", "--api-key", server.api_key,
            "--tokenizer", tiny_model_dirs["llama"]]
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["completed"] == 4 and report["failed"] == 0, report
    assert report["output_tokens"] == 12


def test_request_body_sends_sampling_fields_only_when_plain():
    plain = bench_serve.request_body("m", [1, 2], 8, bench_serve.PLAIN_SAMPLING)
    server_defaults = bench_serve.request_body("m", "text", 8, {})
    assert plain["temperature"] == 1.0 and plain["top_p"] == 1.0
    assert "temperature" not in server_defaults and "top_p" not in server_defaults and "top_k" not in server_defaults
    assert server_defaults["ignore_eos"] and server_defaults["stream"] and server_defaults["prompt"] == "text"


def test_vocab_size_from_tokenizer_or_a_local_model_folder(tiny_model_dirs, tmp_path):
    folder = tiny_model_dirs["llama"]
    assert bench_serve.vocab_size(None, folder) == 512            # pagedllm serve DIR: the API name is DIR
    assert bench_serve.vocab_size(folder, "tiny") == 512
    assert bench_serve.vocab_size(None, "tiny") is None            # a name only: ids below 10,000 as before
    assert bench_serve.vocab_size(None, str(tmp_path)) is None     # a folder without a tokenizer
    with pytest.raises(ValueError, match="--tokenizer"):
        bench_serve.vocab_size(str(tmp_path / "missing"), "tiny")


def test_vllm_flags_save_vllms_result_file(server, tiny_model_dirs, capsys, tmp_path):
    """A `vllm bench serve` command line: --dataset-name random with --input-len/--output-len, --temperature,
    --save-result into --result-dir under vLLM's name, vLLM's summary block on stderr; stdout stays one line."""
    argv = ["bench", "serve", "--base-url", server.url, "--api-key", server.api_key, "--dataset-name", "random",
            "--input-len", "6", "--output-len", "3", "--num-prompts", "4", "--request-rate", "100",
            "--burstiness", "0.5", "--tokenizer", tiny_model_dirs["llama"], "--temperature", "0", "--ignore-eos",
            "--save-result", "--result-dir", str(tmp_path), "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--metric-percentiles", "50,99"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    report = json.loads(out.strip())
    assert report["completed"] == 4 and report["sampling_overrides"] == {"temperature": 0.0}
    [path] = tmp_path.iterdir()
    assert path.name.startswith("openai-100.0qps-") and path.suffix == ".json"
    saved = json.loads(path.read_text())
    assert (saved["completed"], saved["total_input_tokens"], saved["total_output_tokens"]) == (4, 24, 12)
    assert saved["burstiness"] == 0.5 and saved["p99_e2el_ms"] > 0 and saved["median_itl_ms"] > 0
    assert "Serving Benchmark Result" in err and "P50 TPOT (ms):" in err
