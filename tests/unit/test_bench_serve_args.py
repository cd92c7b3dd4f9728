"""`vllm bench serve`'s flags on `pagedllm bench serve`: folded in as vLLM 0.26 takes them or refused naming the
flag, and the result file --save-result writes holds vLLM's keys under vLLM's name."""
import argparse
import json

import numpy as np
import pytest

from pagedllm.bench import serve as bench_serve
from pagedllm.bench import serve_args, serve_result
from pagedllm.bench.workloads import random_workload


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_serve.add_cli_args(parser)
    args = parser.parse_args(list(argv))
    serve_args.resolve(args)
    return args


def test_vllm_defaults_random_prompts_at_host_and_port():
    args = _args()
    assert args.workload == "random" and args.base_url == "http://127.0.0.1:8000"   # vLLM's default dataset
    args = _args("--dataset-name", "random", "--host", "::1", "--port", "8742", "--input-len", "7",
                 "--output-len", "3")
    assert args.base_url == "http://[::1]:8742" and (args.random_input_len, args.random_output_len) == (7, 3)
    assert _args("--base-url", "http://h:1", "--port", "9").base_url == "http://h:1"   # vLLM: the URL wins
    assert args.percentile_metrics == ["ttft", "tpot", "itl"] and args.metric_percentiles == [99.0]


@pytest.mark.parametrize("argv,flag", [
    (["--dataset-name", "sharegpt"], "--dataset-name sharegpt"),
    (["--dataset-path", "x.json"], "--dataset-path"),
    (["--backend", "openai-chat"], "--backend openai-chat"),
    (["--percentile-metrics", "ttft,bogus"], "--percentile-metrics"),
    (["--metric-percentiles", "50,x"], "--metric-percentiles"),
    (["--burstiness", "0"], "--burstiness"),
    (["--metadata", "novalue"], "--metadata"),
    (["--workload", "W1", "--input-len", "5"], "--input-len"),
    (["--dataset-name", "random", "--workload", "W2"], "--dataset-name random"),
])
def test_what_cannot_be_honoured_is_refused_naming_the_flag(argv, flag):
    with pytest.raises(ValueError, match=flag):
        _args(*argv)


def test_sampling_flags_override_and_extra_body_is_sent():
    args = _args("--temperature", "0", "--top-k", "5", "--extra-body", '{"min_tokens": 2}')
    assert args.sampling_overrides == {"temperature": 0.0, "top_k": 5} and args.extra_body == {"min_tokens": 2}


def test_random_prefix_len_puts_one_prefix_before_every_prompt():
    plain, prefixed = random_workload(4, 10, 2, seed=3), random_workload(4, 10, 2, seed=3, prefix_len=5)
    assert all(p[5:] == q for p, q in zip(prefixed.prompts, plain.prompts))
    assert len({tuple(p[:5]) for p in prefixed.prompts}) == 1


def test_burstiness_gaps_keep_the_rate():
    rng = np.random.default_rng(0)
    gaps = [bench_serve._gap(rng, 10.0, 0.25) for _ in range(20000)]
    assert np.mean(gaps) == pytest.approx(0.1, rel=0.05)
    assert np.std(gaps) == pytest.approx(0.1 / 0.25 ** 0.5, rel=0.1)   # gamma: cv = 1 / sqrt(shape)


def _results():
    r1 = bench_serve.RequestResult(ok=True, ttft=0.1, latency=0.4, itls=[0.1, 0.1, 0.1], num_output_tokens=4,
                                   num_chunks=4, start_time=10.0)
    r2 = bench_serve.RequestResult(ok=False, error="HTTP 400", start_time=10.0)
    return [r1, r2]


def test_saved_result_has_vllms_keys_and_name(tmp_path):
    args = _args("--save-result", "--result-dir", str(tmp_path / "out"), "--request-rate", "4",
                 "--max-concurrency", "2", "--percentile-metrics", "ttft,e2el", "--metric-percentiles", "50,99.9",
                 "--metadata", "run=a")
    result = serve_result.build(args, "org/model-x", "org/model-x", [5, 6], _results(), 2.0)
    path = serve_result.save(result, args, "org/model-x")
    assert path == str(tmp_path / "out" / f"openai-4.0qps-concurrency2-model-x-{result['date']}.json")
    saved = json.loads(open(path).read())
    for key in ("date", "backend", "endpoint_type", "label", "model_id", "tokenizer_id", "num_prompts",
                "request_rate", "burstiness", "max_concurrency", "duration", "completed", "failed",
                "total_input_tokens", "total_output_tokens", "request_throughput", "request_goodput",
                "output_throughput", "total_token_throughput", "max_output_tokens_per_s",
                "max_concurrent_requests", "mean_ttft_ms", "median_ttft_ms", "std_ttft_ms", "p50_ttft_ms",
                "p99.9_ttft_ms", "mean_e2el_ms", "p99.9_e2el_ms"):
        assert key in saved, key
    assert "mean_tpot_ms" not in saved and "ttfts" not in saved          # only the metrics asked for
    assert (saved["completed"], saved["failed"], saved["total_input_tokens"]) == (1, 1, 5)
    assert saved["output_throughput"] == 2.0 and saved["mean_e2el_ms"] == pytest.approx(400.0)
    assert saved["max_output_tokens_per_s"] == 4.0 and saved["run"] == "a"
    lines = serve_result.summary(result, args)
    assert lines[0] == "{:=^50}".format(" Serving Benchmark Result ")
    assert "Successful requests:                     1         " in lines
    assert any(line.startswith("P99.9 E2EL (ms):") for line in lines)


def test_result_filename_append_and_detailed(tmp_path):
    args = _args("--append-result", "--result-filename", str(tmp_path / "r.json"), "--save-detailed",
                 "--label", "mine")
    for _ in range(2):
        serve_result.save(serve_result.build(args, "m", None, [5, 6], _results(), 1.0), args, "m")
    first, second = (json.loads(line) for line in open(tmp_path / "r.json").read().splitlines())
    assert first["label"] == "mine" and first["errors"] == ["", "HTTP 400"] and second["input_lens"] == [5, 6]
    assert serve_result.file_name(_args("--label", "x"), "a/b", "D") == "x-infqps-b-D.json"
