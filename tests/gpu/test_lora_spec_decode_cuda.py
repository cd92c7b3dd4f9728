"""LoRA with speculative decoding on CUDA, graphs on (float32): tests/e2e/test_lora_spec_decode.py's checks against
the CUDA engine without speculation, and the verify steps' one-token rows replay the decode graphs with the LoRA
kernels, reading each row's adapter slot from the step buffer those graphs captured (max_num_seqs 64: a verify's
9 x 4 rows fit a decode graph)."""
import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu
_spec = importlib.util.spec_from_file_location("lora_spec_e2e",
                                               Path(__file__).parents[1] / "e2e" / "test_lora_spec_decode.py")
lora_spec = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lora_spec)
setup = lora_spec.setup   # the module fixture: base model, two adapters, a draft with one merged in
CUDA = dict(device="cuda", num_gpu_blocks_override=256, max_num_seqs=64)


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_lora_with_speculation_in_graphs_equals_without(setup, monkeypatch, method):
    from pagedllm.runner.cuda_graph import CudaGraphs
    from pagedllm.runner.model_runner import ModelRunner
    reference = lora_spec.without_speculation(setup, **CUDA)
    replayed, verified = {}, []   # the step's last replay of the target's graphs; per verify, that replay's key
    replay, verify, execute = CudaGraphs.replay, ModelRunner._verify, ModelRunner._execute_async

    def execute_spy(self, sched):
        replayed.clear()
        return execute(self, sched)

    def replay_spy(self, num_tokens, mixed, shared=False, lora=False):
        replayed["key"] = (num_tokens, mixed, lora)
        return replay(self, num_tokens, mixed, shared, lora)

    def verify_spy(self, pending, layout, *a):
        verified.append(replayed.pop("key", None))
        return verify(self, pending, layout, *a)
    monkeypatch.setattr(CudaGraphs, "replay", replay_spy)
    monkeypatch.setattr(ModelRunner, "_verify", verify_spy)
    monkeypatch.setattr(ModelRunner, "_execute_async", execute_spy)
    llm = lora_spec.check_speculation(setup, method, reference, tol=1e-3, **CUDA)
    assert llm.engine.runner.graphs is not None
    assert any(key is not None and key[2] for key in verified), verified   # verified in a graph, LoRA kernels on
