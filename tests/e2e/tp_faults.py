"""Tensor-parallel worker processes that meet a fault alone (as an OOM on that rank's GPU only): spawn targets that
tests/e2e/test_tensor_parallel.py puts in place of the executor's run_worker_process. A module of its own: the
spawned process imports the target by name."""
from conftest import raising_at_call

from pagedllm.distributed import worker


def failing_worker_process(call: str, n: int, *args):
    """run_worker_process, but the worker's n-th `call` ("execute": the launch, "result": the read) raises."""
    from pagedllm.runner.model_runner import ModelRunner, PendingOutput
    worker.RESET_WAIT_SECONDS = 2.0  # noqa   # the test's wait, not the engine's
    cls, name = {"execute": (ModelRunner, "execute_async"), "result": (PendingOutput, "result")}[call]
    setattr(cls, name, raising_at_call(getattr(cls, name), n, RuntimeError("out of memory (on this rank alone)")))
    worker.run_worker_process(*args)
