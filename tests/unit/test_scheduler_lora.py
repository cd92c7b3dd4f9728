"""The scheduler's LoRA rules without a model: running requests hold at most max_loras distinct adapters; an
adapter request that must wait for a slot takes the next one (no other new adapter before it); requests of running
adapters that arrived before it began to wait pass it (vLLM's rule), later ones wait behind it (no starvation);
base requests pass; the adapter is in the first block's hash."""
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


def _run(sched, arrivals=()):
    """Schedules to the end; arrivals: (step, req_id, lora) added before that step. Returns the admission order."""
    order, step = [], 0
    while sched.has_unfinished_requests() or arrivals:
        for _, rid, lora in [a for a in arrivals if a[0] == step]:
            add(sched, rid, lora)
        arrivals = [a for a in arrivals if a[0] != step]
        out = sched.schedule()
        order += [r.req_id for r in out.new_reqs]
        assert len({sched.requests[r].lora_int_id for r in out.num_scheduled_tokens} - {0}) <= sched.max_loras
        sched.update_from_output(out, fake_runner(sched, out))
        step += 1
    return order


def test_max_loras_running_adapters_and_base_rows_pass():
    sched = Scheduler(KVCacheManager(64, BS), 8, 64, 256, max_loras=1)
    for rid, lora in [("a1", L1), ("b1", L2), ("a2", L1), ("base", None)]:
        add(sched, rid, lora)
    # b1 waits for a slot; a2 (adapter 1 runs, queued before b1 began to wait) and the base row pass it
    assert _run(sched) == ["a1", "a2", "base", "b1"]


def test_a_waiting_adapter_is_not_starved():
    """a3..a5 arrive for the running adapter after b1 began to wait: they wait behind b1, so adapter 1 drains."""
    sched = Scheduler(KVCacheManager(64, BS), 8, 64, 256, max_loras=1)
    add(sched, "a1", L1, max_tokens=4)
    add(sched, "b1", L2)
    order = _run(sched, [(1, "a3", L1), (2, "a4", L1), (2, "c", None), (3, "a5", L1)])
    assert order.index("b1") < order.index("a3") and order.index("c") < order.index("b1")
    assert order[0] == "a1" and sorted(order) == ["a1", "a3", "a4", "a5", "b1", "c"]


def test_adapter_in_block_hash():
    base = Request("x", list(range(8)), SamplingParams(), 1, BS)
    a = Request("y", list(range(8)), SamplingParams(), 1, BS, lora_request=L1)
    b = Request("z", list(range(8)), SamplingParams(), 1, BS, lora_request=L2)
    salted = Request("s", list(range(8)), SamplingParams(), 1, BS, cache_salt="k", lora_request=L1)
    hashes = [r.block_hashes[0] for r in (base, a, b, salted)]
    assert len(set(hashes)) == 4
    same = Request("w", list(range(8)), SamplingParams(), 1, BS, lora_request=LoRARequest("a", 1, "/a"))
    assert same.block_hashes == a.block_hashes


def test_stats_count_running_and_waiting_requests_by_adapter():
    """vLLM's lora_requests_info labels: each adapter's running and waiting requests (None with LoRA off)."""
    sched = Scheduler(KVCacheManager(64, BS), 8, 64, 256, max_loras=1)
    for rid, lora in [("a1", L1), ("b1", L2), ("a2", L1), ("base", None)]:
        add(sched, rid, lora)
    stats = sched.make_stats()
    assert stats.running_lora_adapters == {} and stats.waiting_lora_adapters == {"a": 2, "b": 1}
    sched.schedule()
    stats = sched.make_stats()
    assert stats.running_lora_adapters == {"a": 2} and stats.waiting_lora_adapters == {"b": 1}
    assert Scheduler(KVCacheManager(64, BS), 8, 64, 256).make_stats().running_lora_adapters is None
