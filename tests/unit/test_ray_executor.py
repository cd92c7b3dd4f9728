"""The Ray executor's pieces that need no cluster: the backend field's checks, rank 0's GPU as this process
numbers it, and that an engine without the Ray backend never imports ray."""
import subprocess
import sys

import pytest

from pagedllm.config import EngineConfig
from pagedllm.distributed.ray_executor import local_gpu_index


def test_backend_field():
    assert EngineConfig("m", tensor_parallel_size=2).distributed_executor_backend is None   # mp
    with pytest.raises(ValueError, match="distributed_executor_backend must be None or one of"):
        EngineConfig("m", distributed_executor_backend="rays")


def test_ray_backend_needs_ray(monkeypatch):
    import importlib.util
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else find(name, *a))
    with pytest.raises(ValueError, match=r"distributed_executor_backend must be .*pip install ray"):
        EngineConfig("m", tensor_parallel_size=2, distributed_executor_backend="ray")
    EngineConfig("m", distributed_executor_backend="ray")   # size 1: in-process, ray unused


@pytest.mark.parametrize("gpu, visible, index",
                         [("3", None, 3), ("3", "", 3), ("3", "2,3", 1), ("GPU-ab", "GPU-ab", 0)])
def test_local_gpu_index(gpu, visible, index):
    assert local_gpu_index(gpu, visible) == index


def test_local_gpu_index_not_visible():
    with pytest.raises(ValueError, match="Ray reserved GPU 5 for rank 0, but this process sees only"):
        local_gpu_index("5", "0,1")


def test_engine_does_not_import_ray():
    code = ("import sys, pagedllm.llm, pagedllm.engine.core, pagedllm.engine.async_llm, pagedllm.distributed.executor,"
            " pagedllm.distributed.ray_executor, pagedllm.server.api_server; assert 'ray' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
