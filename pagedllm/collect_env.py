"""`pagedllm collect-env` (vLLM's `vllm collect-env`): what a bug report needs about this machine. PyTorch's own
report (OS, Python, CUDA, GPUs, drivers), then pagedllm's version, the versions of the libraries it runs on, and
the PAGEDLLM_* / VLLM_* / HF_* variables set (a value that may be a secret shown as ***)."""
import os
import re
from importlib import metadata

from pagedllm import __version__

SECRET = re.compile(r"KEY|TOKEN|SECRET|PASSWORD", re.IGNORECASE)


def report() -> str:
    import torch.utils.collect_env
    lines = [torch.utils.collect_env.get_pretty_env_info(), "", f"pagedllm version: {__version__}", "",
             "Versions of the libraries pagedllm runs on:"]
    for name in _packages():
        try:
            lines.append(f"  {name}: {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            lines.append(f"  {name}: not installed")
    lines += ["", "Environment variables:"]
    names = sorted(n for n in os.environ if n.startswith(("PAGEDLLM_", "VLLM_", "HF_", "CUDA_VISIBLE_DEVICES")))
    lines += [f"  {n}={'***' if SECRET.search(n) else os.environ[n]}" for n in names] or ["  (none set)"]
    return "\n".join(lines)


def _packages() -> list[str]:
    """pagedllm's requirements as installed (pyproject's dependencies and its ray and fa4 extras, not the test
    extra's), and triton, which CUDA builds of torch bring."""
    names = [re.split(r"[\s<>=!~;\[(]", r, maxsplit=1)[0] for r in metadata.requires("pagedllm") or ()
             if '"test"' not in r]
    return [*dict.fromkeys([*names, "triton"])]
