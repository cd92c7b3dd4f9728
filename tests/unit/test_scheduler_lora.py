"""The scheduler's LoRA rules without a model: running requests hold at most max_loras distinct adapters; an
adapter request that must wait holds back later adapter requests (FIFO, no starvation), not base ones; the
adapter is in the first block's hash."""
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.scheduler import Scheduler
from pagedllm.lora.request import LoRARequest
from pagedllm.request import Request
from pagedllm.sampling_params import SamplingParams

from test_scheduler import BS, fake_runner

L1, L2 = LoRARequest("a", 1, "/a"), LoRARequest("b", 2, "/b")


def add(sched, req_id, lora=None, max_tokens=3):
    req = Request(req_id, list(range(8)), SamplingParams(ignore_eos=True), max_tokens, BS, lora_request=lora)
    sched.add_request(req)
    return req


def test_max_loras_fifo_and_base_rows_pass():
    sched = Scheduler(KVCacheManager(64, BS), 8, 64, 256, max_loras=1)
    for rid, lora in [("a1", L1), ("b1", L2), ("a2", L1), ("base", None)]:
        add(sched, rid, lora)
    order, steps = [], 0
    while sched.has_unfinished_requests():
        out = sched.schedule()
        order += [r.req_id for r in out.new_reqs]
        assert len({sched.requests[r].lora_int_id for r in out.num_scheduled_tokens} - {0}) <= 1
        sched.update_from_output(out, fake_runner(sched, out))
        steps += 1
    # b1 waits for a1's adapter to drain; a2 (a running adapter) waits behind b1: FIFO; the base row passes
    assert order == ["a1", "base", "b1", "a2"]


def test_adapter_in_block_hash():
    base = Request("x", list(range(8)), SamplingParams(), 1, BS)
    a = Request("y", list(range(8)), SamplingParams(), 1, BS, lora_request=L1)
    b = Request("z", list(range(8)), SamplingParams(), 1, BS, lora_request=L2)
    salted = Request("s", list(range(8)), SamplingParams(), 1, BS, cache_salt="k", lora_request=L1)
    hashes = [r.block_hashes[0] for r in (base, a, b, salted)]
    assert len(set(hashes)) == 4
    same = Request("w", list(range(8)), SamplingParams(), 1, BS, lora_request=LoRARequest("a", 1, "/a"))
    assert same.block_hashes == a.block_hashes
