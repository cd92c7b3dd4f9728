"""`pagedllm bench throughput` end to end on CPU with a tiny random model, a few requests and a capped
output length; the figures are checked against the workload and the KV accounting's definition."""
import json

import pytest
import torch
from conftest import make_tiny_model

from pagedllm.bench import hf_baseline
from pagedllm.bench.workloads import build
from pagedllm.cli import main

BS = 16
CAP = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # Workload token ids go up to 9999 and W1 prompts past 512 tokens.
    return make_tiny_model(tmp_path_factory.mktemp("bench") / "tiny10k", vocab_size=10000,
                           max_position_embeddings=4096)


def run_cli(capsys, argv) -> dict:
    assert main(["bench", "throughput", *argv]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])


def expected_peak(prompt_lens, num_steps):
    """Every request admitted in step 0 and running `num_steps` steps; step s holds prompt + s tokens.
    Returns (blocks, empty slots) at the first step with the most blocks in use."""
    steps = [(sum(-(-(p + s) // BS) for p in prompt_lens), sum(prompt_lens) + s * len(prompt_lens))
             for s in range(num_steps)]
    blocks, tokens = next(st for st in steps if st[0] == max(b for b, _ in steps))
    return blocks, blocks * BS - tokens


def test_pagedllm_engine_json_and_kv_accounting(model_dir, capsys, tmp_path):
    out_file = tmp_path / "runs.jsonl"
    result = run_cli(capsys, ["--workload", "W1", "--model", model_dir, "--load-format", "dummy",
                              "--num-requests", "3", "--max-output-len-cap", str(CAP), "--block-size", str(BS),
                              "--num-gpu-blocks-override", "256", "--output-json", str(out_file)])
    assert json.loads(out_file.read_text()) == result
    w = build("W1")
    prompt_lens = [len(p) for p in w.prompts[:3]]
    assert (result["workload"], result["engine"], result["num_requests"]) == ("W1", "pagedllm", 3)
    assert result["num_input_tokens"] == sum(prompt_lens)
    assert result["num_output_tokens"] == sum(min(k, CAP) for k in w.output_lens[:3]) == 3 * CAP
    assert result["seconds"] > 0 and result["startup_s"] > 0
    assert result["output_tok_s"] == pytest.approx(3 * CAP / result["seconds"], rel=1e-2, abs=0.1)
    assert (result["device"], result["dtype"], result["kv_blocks"]) == ("cpu", "float32", 256)
    assert result["preemptions"] == 0 and result["max_output_len_cap"] == CAP
    # The last sampled token is never computed: CAP steps, holding prompt + 0 .. CAP - 1 tokens.
    blocks, empty = expected_peak(prompt_lens, CAP)
    assert (result["peak_blocks"], result["peak_running"]) == (blocks, 3)
    assert result["kv_waste_at_peak"] == round(empty / (blocks * BS), 5)


def test_hf_engine_json(model_dir, capsys):
    result = run_cli(capsys, ["--workload", "W1", "--model", model_dir, "--engine", "hf", "--num-requests", "3",
                              "--hf-batch-size", "2", "--max-output-len-cap", str(CAP)])
    assert (result["engine"], result["counted"], result["hf_batch_size"]) == ("hf", "requested", 2)
    assert result["num_output_tokens"] == 3 * CAP and result["seconds"] > 0
    assert (result["device"], result["dtype"], result["kv_waste_at_peak"]) == ("cpu", "float32", None)


def test_bad_flags_are_named(model_dir, capsys, tmp_path):
    assert main(["bench", "throughput", "--workload", "W1", "--model", model_dir, "--num-requests", "300"]) == 2
    assert "--num-requests must be in [1, 256] for W1" in capsys.readouterr().err
    small_vocab = make_tiny_model(tmp_path / "tiny512", vocab_size=512)
    assert main(["bench", "throughput", "--workload", "W1", "--model", small_vocab, "--engine", "hf"]) == 2
    assert "vocab_size must be > 9999" in capsys.readouterr().err


def test_hf_static_batch_ignores_eos_and_samples_the_full_vocabulary(model_dir):
    """Logits forced uniform except a huge EOS: with EOS disabled each row still runs to max_new_tokens;
    then uniform logits: far more than top_k=50 (transformers' default) distinct tokens come out."""
    from transformers import AutoConfig
    model = hf_baseline.load_random_model(AutoConfig.from_pretrained(model_dir), torch.float32, torch.device("cpu"))
    eos = AutoConfig.from_pretrained(model_dir).eos_token_id
    eos_bias = torch.zeros(10000)
    eos_bias[eos] = 1e4
    handle = model.lm_head.register_forward_hook(lambda m, i, out: torch.zeros_like(out) + eos_bias)
    new_ids = hf_baseline.generate_batch(model, [[5, 6, 7], [8, 9]], max_new_tokens=6)
    assert new_ids.shape == (2, 6) and (new_ids == eos).all()
    handle.remove()
    model.lm_head.register_forward_hook(lambda m, i, out: torch.zeros_like(out))
    torch.manual_seed(0)
    new_ids = hf_baseline.generate_batch(model, [[5, 6, 7]], max_new_tokens=60)
    assert new_ids.shape == (1, 60) and len(set(new_ids.flatten().tolist())) > 50


def test_vllm_command_line_random_prompts_n_and_output_json(model_dir, capsys, tmp_path):
    """`vllm bench throughput --input-len --output-len --num-prompts --n --output-json` (no --workload): vLLM's
    random dataset, all n outputs counted, vLLM's keys in the JSON and its lines on stderr; it was refused
    (--workload required)."""
    out = tmp_path / "r.json"
    assert main(["bench", "throughput", "--model", model_dir, "--input-len", "12", "--output-len", "3",
                 "--num-prompts", "5", "--n", "2", "--output-json", str(out), "--block-size", str(BS)]) == 0
    stdout, stderr = capsys.readouterr()
    result = json.loads(stdout.strip())
    assert (result["workload"], result["num_requests"], result["num_input_tokens"]) == ("random", 5, 60)
    assert result["num_output_tokens"] == 5 * 3 * 2 and result["total_num_tokens"] == 90
    assert result["tokens_per_second"] == pytest.approx(90 / result["elapsed_time"])
    assert json.loads(out.read_text())["requests_per_second"] == pytest.approx(5 / result["elapsed_time"])
    assert "Throughput: " in stderr and "Total num output tokens:  30" in stderr


@pytest.mark.parametrize("argv,flag", [([], "--input-len"), (["--input-len", "4", "--dataset-name", "sonnet"],
                                       "--dataset-name sonnet"), (["--input-len", "4", "--backend", "mii"],
                                       "--backend mii"), (["--workload", "W1", "--input-len", "4"], "--workload")])
def test_what_is_not_built_is_refused_naming_the_flag(model_dir, capsys, argv, flag):
    assert main(["bench", "throughput", "--model", model_dir, *argv]) != 0
    assert flag in capsys.readouterr().err
