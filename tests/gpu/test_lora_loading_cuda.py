"""LoRA adapters read on the loader threads on CUDA: the host copies staged there are pinned (a slot's fill is a
non-blocking copy), and a request whose adapter is read while a base request runs gets PEFT's greedy tokens."""
import importlib.util
from pathlib import Path

import pytest

from pagedllm import LLM

pytestmark = pytest.mark.gpu
_spec = importlib.util.spec_from_file_location("lora_e2e", Path(__file__).parents[1] / "e2e" / "test_lora.py")
lora_e2e = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lora_e2e)
setup = lora_e2e.setup   # the module fixture: base model, three adapters, transformers + PEFT references


def test_adapter_read_off_the_loop_on_cuda(setup):
    base, loras, refs = setup
    engine = LLM(base, device="cuda", dtype="float32", log_stats_interval=0, enable_lora=True, max_loras=2,
                 num_gpu_blocks_override=256).engine
    engine.add_request("base", lora_e2e.PROMPTS[2], lora_e2e.GREEDY)
    engine.step()
    for rid, name, i in (("rs", "rs", 1), ("attn", "attn", 3)):
        engine.add_request(rid, lora_e2e.PROMPTS[i], lora_e2e.GREEDY, lora_request=loras[name])
    done = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o.outputs[0].token_ids
    assert done == {"base": refs[None][2][0], "rs": refs["rs"][1][0], "attn": refs["attn"][3][0]}
    for lora in engine.runner.lora.cpu.values():
        for shards in lora.modules.values():
            assert all(a.is_pinned() and b.is_pinned() for a, b in shards.values())
    stats = engine.get_stats()
    assert stats.num_blocks_free == stats.num_blocks_total
