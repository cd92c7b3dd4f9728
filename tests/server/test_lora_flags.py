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


def test_lora_target_modules(serve_args):
    """vLLM's --lora-target-modules (the linears that take adapters): 'unrecognized arguments' here."""
    from pagedllm.config import LORA_TARGET_MODULES
    from pagedllm.lora.layers import MODULES, selected_modules
    assert serve_args()[0].lora_target_modules is None
    assert serve_args("--lora-target-modules", "o_proj", "q_proj")[0].lora_target_modules == ["o_proj", "q_proj"]
    assert set(LORA_TARGET_MODULES) == {n for m, fused in MODULES.items() for n in (m.rsplit(".", 1)[1], *fused)}
    assert selected_modules(["q_proj", "down_proj"]) == ("self_attn.qkv_proj", "mlp.down_proj")   # q_proj: qkv
    assert selected_modules(["gate_up_proj"]) == ("mlp.gate_up_proj",)
    for bad in (["lm_head"], [], ["o_proj", "embed_tokens"]):
        with pytest.raises(ValueError, match="lora_target_modules must be None"):
            EngineConfig(enable_lora=True, lora_target_modules=bad)


def test_vllm_lora_flags_not_built_are_taken_or_refused_saying_why(serve_args, capsys):
    """Were 'unrecognized arguments' (no why)."""
    from pagedllm import LLM
    serve_args("--fully-sharded-loras", "--specialize-active-lora", "--default-mm-loras", "{}",
               "--no-enable-tower-connector-lora", "--no-enable-mixed-moe-lora-format", "--no-enable-moe-shared-loras")
    for flags, words in [
            (["--default-mm-loras", '{"audio": "/adapters/speech"}'], "--default-mm-loras {\"audio\": "
             "\"/adapters/speech\"}: multimodal inputs are not built"),
            (["--enable-tower-connector-lora"], "--enable-tower-connector-lora: LoRA on a multimodal model's vision"),
            (["--enable-moe-shared-loras"], "LoRA is refused for mixture-of-experts models")]:
        assert main(["serve", DEMO_MODEL, "--device", "cpu", "--enable-lora", *flags]) == 2
        assert words in capsys.readouterr().err
    with pytest.raises(ValueError, match="LLM\\(default_mm_loras=.*multimodal inputs are not built"):
        LLM(DEMO_MODEL, device="cpu", enable_lora=True, default_mm_loras={"image": "/a"})
