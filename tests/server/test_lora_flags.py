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
