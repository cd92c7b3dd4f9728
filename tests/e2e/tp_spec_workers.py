"""A tensor-parallel worker process whose runner launches DraftModel.prepass on a CPU as rank 0's does in
tests/e2e/test_tensor_parallel_spec.py (PREPASS_ON_CPU, a module flag the spawned process does not inherit). A
module of its own: the spawned process imports the target by name."""
from pagedllm.distributed import worker


def prepass_on_cpu_worker_process(*args):
    from pagedllm.runner import model_runner
    model_runner.PREPASS_ON_CPU = True
    worker.run_worker_process(*args)
