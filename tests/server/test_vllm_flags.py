"""`vllm serve` command lines as vLLM's docs and model cards write them: each flag is taken and honoured, or
refused at start naming the flag and why. Parsing only: serve() is replaced, no model loads."""
import pytest

import pagedllm.server.launch as launch
from pagedllm.cli import main
from pagedllm.config import DEMO_MODEL


@pytest.fixture
def serve_args(monkeypatch):
    """parse(*flags) -> (engine_config, server_config) of `pagedllm serve DEMO_MODEL *flags`."""
    started = []
    monkeypatch.setattr(launch, "serve", lambda engine, server: started.append((engine, server)))

    def parse(*flags):
        assert main(["serve", DEMO_MODEL, "--device", "cpu", *flags]) == 0
        return started.pop()
    return parse


def test_underscored_flags_are_vllms_dashed_ones(serve_args):
    """Mistral's model cards write --tokenizer_mode, --max_model_len: vLLM's parser takes underscores."""
    engine, server = serve_args("--max_model_len", "2048", "--gpu_memory_utilization=0.5", "--enable_prefix_caching",
                                "--served_model_name", "m")
    assert (engine.max_model_len, engine.gpu_memory_utilization, server.served_model_name) == (2048, 0.5, ["m"])
    engine, _ = serve_args("--no_enable_prefix_caching", "--override_generation_config", '{"top_k": 5}')
    assert engine.enable_prefix_caching is False and engine.override_generation_config == {"top_k": 5}


def test_help_with_vllms_search_term_prints_the_help(capsys):
    """vLLM's --help=all (or --help=<group>) searches its help; here it prints the whole help."""
    with pytest.raises(SystemExit) as e:
        main(["serve", "--help=all"])
    assert e.value.code == 0 and "--max-model-len" in capsys.readouterr().out


def test_vllms_short_flags_tp_and_q(serve_args):
    engine, _ = serve_args("-tp", "1", "-q", "fp8")
    assert (engine.tensor_parallel_size, engine.quantization) == (1, "fp8")


def test_kv_cache_memory_bytes_is_vllms_name_with_its_human_readable_sizes(serve_args):
    assert serve_args("--kv-cache-memory-bytes", "1G")[0].kv_cache_memory == 2**30
    assert serve_args("--kv-cache-memory", "500m")[0].kv_cache_memory == 500 * 10**6
    assert serve_args("--kv-cache-memory", "1048576")[0].kv_cache_memory == 2**20
