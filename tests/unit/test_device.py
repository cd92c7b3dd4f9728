"""--device naming a CUDA device that is not there: a clear error (CLI exit code 2, ValueError offline)."""
import pytest
import torch

from pagedllm import LLM
from pagedllm.cli import main
from pagedllm.engine.engine import resolve_device


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_cli_device_cuda_without_cuda(no_cuda, capsys):
    assert main(["generate", "--device", "cuda", "--max-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device cuda but no CUDA device is available"), err
    assert "Traceback" not in err


def test_llm_device_cuda_without_cuda(no_cuda):
    with pytest.raises(ValueError, match="--device cuda:0 but no CUDA device is available"):
        LLM(device="cuda:0")


def test_device_index_beyond_count(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match=r"--device cuda:2 but only 2 CUDA device\(s\) are available"):
        resolve_device("cuda:2")


def test_device_unknown_name():
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N, got 'gpu'"):
        resolve_device("gpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    assert resolve_device("cpu") == torch.device("cpu")
