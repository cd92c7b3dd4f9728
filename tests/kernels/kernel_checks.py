"""What the kernel tests share: the relative error they are judged by, and running a cases script under the
Triton interpreter (TRITON_INTERPRET is read when kernels are decorated, hence a process of its own)."""
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def interpreter_env() -> dict[str, str]:
    """The interpreter runs each program in Python on one core; torch's OpenMP threads (a core each by default)
    only spin against it: one thread unless OMP_NUM_THREADS says otherwise (the LoRA engine cases: 20-26 s on
    CI's 2 shared cores, 14 s on one thread)."""
    return {"OMP_NUM_THREADS": "1", **os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}


def run_under_interpreter(script: str, timeout: int, *args: str, check: bool = True) -> str:
    """Runs tests/kernels/<script> [args] with TRITON_INTERPRET=1 on CPU; returns its output, which must end well
    (check=False: its stdout and stderr, however it ended)."""
    env = interpreter_env()
    result = subprocess.run([sys.executable, str(Path(__file__).with_name(script)), *args], check=False, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if not check:
        return result.stdout + result.stderr
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def run_under_interpreter_side_by_side(script: str, timeout: int, arg_lists: list[list[str]]) -> str:
    """run_under_interpreter of `script` once per args list, the processes side by side (the interpreter is
    Python on one core: on CI's two cores two halves of the cases take half the time); their outputs, each of
    which must end well. Outputs go to files: a full pipe would stop a process that the others wait behind."""
    env = interpreter_env()
    files = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in arg_lists]
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).with_name(script)), *args], env=env,
                              stdout=out, stderr=err, text=True) for args, (out, err) in zip(arg_lists, files)]
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for proc, (out, err) in zip(procs, files):
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            out.seek(0)
            err.seek(0)
            stdout = out.read()
            assert proc.returncode == 0, stdout + err.read()
            outputs.append(stdout)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for out, err in files:
            out.close()
            err.close()
    return "".join(outputs)
