"""What the kernel tests share: the relative error they are judged by, and running a cases script under the
Triton interpreter (TRITON_INTERPRET is read when kernels are decorated, hence a process of its own)."""
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def run_under_interpreter(script: str, timeout: int, *args: str) -> str:
    """Runs tests/kernels/<script> [args] with TRITON_INTERPRET=1 on CPU; returns its output, which must end well."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(Path(__file__).with_name(script)), *args], check=False, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout
