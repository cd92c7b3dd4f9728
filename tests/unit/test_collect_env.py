"""`pagedllm collect-env` (vLLM's `vllm collect-env`; it was "invalid choice"): torch's report, pagedllm's
version, its libraries' versions, and the variables that steer it, secrets masked."""
from pagedllm import __version__
from pagedllm.cli import main


def test_collect_env_reports_versions_and_masks_secrets(capsys, monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", "hunter2")
    monkeypatch.setenv("PAGEDLLM_LONG_PREFILL", "cudnn")
    assert main(["collect-env"]) == 0
    out = capsys.readouterr().out
    assert "PyTorch version:" in out and f"pagedllm version: {__version__}" in out
    assert "  transformers: " in out and "  xgrammar: " in out
    assert "PAGEDLLM_LONG_PREFILL=cudnn" in out and "VLLM_API_KEY=***" in out and "hunter2" not in out
