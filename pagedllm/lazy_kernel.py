"""Triton kernels bound on first use, so the CPU path imports no triton (the CPU torch wheel has none).

    rms_norm = lazy_kernel(globals(), "pagedllm.layers.kernels.rms_norm", "rms_norm")

binds `rms_norm` to a stub; its first call (on CUDA) imports the kernel module and rebinds the caller's
global to the real function, so every later call goes straight to it: the hot path pays nothing.
"""
import importlib
from collections.abc import Callable


def lazy_kernel(namespace: dict, module: str, name: str) -> Callable:
    """A stand-in for `from module import name` in the module whose globals() is namespace."""
    def first_call(*args, **kwargs):
        fn = getattr(importlib.import_module(module), name)
        namespace[name] = fn
        return fn(*args, **kwargs)
    return first_call
