"""vLLM's LoRA flags on `pagedllm serve` and as LLM(...) arguments: each taken with vLLM's meaning, or refused at
start naming the flag and why. Parsing only: serve() is replaced, no model loads."""
import pytest

import pagedllm.server.launch as launch
from pagedllm.cli import main
from pagedllm.config import DEMO_MODEL, EngineConfig


@pytest.fixture
def serve_args(monkeypatch):
    """parse(*flags) -> (engine_config, server_config) of `pagedllm serve DEMO_MODEL --enable-lora *flags`."""
    started = []
    monkeypatch.setattr(launch, "serve", lambda engine, server: started.append((engine, server)))

    def parse(*flags):
        assert main(["serve", DEMO_MODEL, "--device", "cpu", "--enable-lora", *flags]) == 0
        return started.pop()
    return parse


def test_max_cpu_loras_zero_is_the_default(serve_args):
    """vLLM's EngineArgs reads --max-cpu-loras 0 (or less) as unset (max_loras); here it was refused."""
    assert serve_args("--max-cpu-loras", "0")[0].max_cpu_loras is None
    assert EngineConfig(enable_lora=True, max_loras=2, max_cpu_loras=-1).max_cpu_loras is None
    assert serve_args("--max-loras", "2", "--max-cpu-loras", "3")[0].max_cpu_loras == 3
    with pytest.raises(ValueError, match="max_cpu_loras must be None or >= max_loras"):
        EngineConfig(enable_lora=True, max_loras=2, max_cpu_loras=1)


def test_lora_dtype(serve_args, capsys):
    """vLLM's --lora-dtype (auto, float16, bfloat16; a torch.dtype from Python): 'unrecognized arguments' here."""
    import torch
    assert serve_args()[0].lora_dtype == "auto"
    assert serve_args("--lora-dtype", "bfloat16")[0].lora_dtype == "bfloat16"
    assert EngineConfig(enable_lora=True, lora_dtype=torch.float16).lora_dtype == "float16"
    with pytest.raises(SystemExit):
        main(["serve", DEMO_MODEL, "--lora-dtype", "float8"])
    assert "--lora-dtype: invalid choice: 'float8'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="lora_dtype must be one of"):
        EngineConfig(enable_lora=True, lora_dtype=torch.int8)
