"""`pagedllm bench latency`, vLLM's `vllm bench latency`: its flags, defaults, printed lines and --output-json keys.
It did not exist (argparse: invalid choice 'latency')."""
import json
import os

import pytest

from pagedllm.bench import latency as bench_latency
from pagedllm.cli import main


def test_runs_prints_vllms_lines_and_writes_its_json(tiny_model_dirs, capsys, tmp_path):
    out = tmp_path / "lat.json"
    argv = ["bench", "latency", "--model", tiny_model_dirs["llama"], "--input-len", "6", "--output-len", "3",
            "--batch-size", "2", "--num-iters-warmup", "1", "--num-iters", "3", "--output-json", str(out)]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Warming up..." and lines[1].startswith("Avg latency: ") and lines[1].endswith(" seconds")
    assert [line.split("%")[0] for line in lines[2:]] == ["10", "25", "50", "75", "90", "99"]
    saved = json.loads(out.read_text())
    assert len(saved["latencies"]) == 3 and list(saved["percentiles"]) == ["10", "25", "50", "75", "90", "99"]
    assert saved["avg_latency"] == pytest.approx(sum(saved["latencies"]) / 3)


def test_defaults_are_vllms(monkeypatch, tiny_model_dirs):
    seen = {}
    monkeypatch.setattr(bench_latency, "main", lambda args, kwargs: seen.update(args=args, kwargs=kwargs))
    assert main(["bench", "latency", "--model", tiny_model_dirs["llama"]]) == 0
    args = seen["args"]
    assert (args.input_len, args.output_len, args.batch_size, args.n) == (32, 128, 8, 1)
    assert (args.num_iters_warmup, args.num_iters) == (10, 30)
    assert seen["kwargs"]["enable_prefix_caching"] is False       # vLLM turns it off for this benchmark
    assert main(["bench", "latency", "--model", tiny_model_dirs["llama"], "--enable-prefix-caching"]) == 0
    assert seen["kwargs"]["enable_prefix_caching"] is True


def test_profile_traces_one_batch_with_the_profiler_config(tiny_model_dirs, capsys, tmp_path):
    """vLLM's --profile: after the warm-up, one batch between start_profile and stop_profile (the
    --profiler-config's profiler), no latencies. It was refused ("profiling is not built")."""
    argv = ["bench", "latency", "--model", tiny_model_dirs["llama"], "--input-len", "6", "--output-len", "3",
            "--batch-size", "2", "--num-iters-warmup", "1", "--profile", "--profiler-config.profiler=torch",
            f"--profiler-config.torch_profiler_dir={tmp_path}"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["Warming up...", f"Profiling with torch profiler (results will be saved to {tmp_path})..."]
    assert any(f.endswith(".pt.trace.json.gz") for f in os.listdir(tmp_path))


@pytest.mark.parametrize("argv,flag", [(["--profile"], "--profiler-config"), (["--input-len", "500"], "--input-len"),
                                       (["--num-iters", "0"], "--num-iters")])
def test_refused_naming_the_flag(tiny_model_dirs, capsys, argv, flag):
    assert main(["bench", "latency", "--model", tiny_model_dirs["llama"], "--num-iters-warmup", "0", *argv]) != 0
    assert flag in capsys.readouterr().err
