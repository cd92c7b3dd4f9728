"""The KV tiers' bookkeeping (core/offload.py) with the scheduler, on fake sizes and no model.

A symbolic runner stands in for the GPU, the CPU pool and the disk: each block or slot holds the token ids
written into it. It performs each step's KVTransfers in the order runner/kv_offload.py documents, then checks,
before the "forward", that every scheduled request finds all its computed tokens in its blocks: a load from
the wrong slot, a slot reused too early, or a disk write of stale bytes shows up as a wrong token.
"""
import numpy as np
import pytest

from pagedllm.config import EngineConfig
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.messages import KVTransferResult, ModelRunnerOutput
from pagedllm.core.offload import KVOffloadManager, TierSizes
from pagedllm.core.scheduler import Scheduler
from pagedllm.request import Request, RequestStatus
from pagedllm.sampling_params import SamplingParams

BS = 4


class SymbolicRunner:
    def __init__(self, sched: Scheduler, num_blocks: int, num_slots: int, corrupt_every: int = 0, seed: int = 0):
        self.sched = sched
        self.gpu = [[None] * BS for _ in range(num_blocks)]
        self.cpu = [[None] * BS for _ in range(num_slots)]
        self.disk: dict[bytes, list] = {}
        self.max_disk_files = 0
        self.corrupt_every = corrupt_every   # fail every n-th disk read, as a corrupt file would
        self.num_reads = 0
        self.rng = np.random.default_rng(seed)
        self.in_flight: dict[str, int] = {}   # the last token sampled for each request

    def execute(self, out) -> ModelRunnerOutput:
        t, result = out.kv_transfers, KVTransferResult()
        for op in t.disk_ops:   # GPU blocks change only at the loads below: reading them here is the same
            if op.cpu_slot is not None:
                self.disk[op.block_hash] = list(self.cpu[op.cpu_slot])
            elif op.gpu_block is not None:
                self.disk[op.block_hash] = list(self.gpu[op.gpu_block])
            else:
                self.disk.pop(op.block_hash, None)
            self.max_disk_files = max(self.max_disk_files, len(self.disk))
        for h, slot in t.disk_reads:
            self.num_reads += 1
            if h not in self.disk or (self.corrupt_every and self.num_reads % self.corrupt_every == 0):
                self.disk.pop(h, None)
                result.failed_reads[h] = "checksum mismatch"
            else:
                self.cpu[slot] = list(self.disk[h])
        leaving = [(list(self.gpu[b]), s) for b, s in t.swap_out + t.cpu_store]
        for content, slot in leaving:
            self.cpu[slot] = content
        for slot, b in t.swap_in + t.cpu_load:
            self.gpu[b] = list(self.cpu[slot])
        return self._forward(out, result)

    def _forward(self, out, result) -> ModelRunnerOutput:
        """Steps are pipelined as in the engine: a request's last token may be the one the previous step
        sampled, which the scheduler has not appended yet."""
        runner_out = ModelRunnerOutput(kv_transfer=result)
        for req_id, n in out.num_scheduled_tokens.items():
            req = self.sched.requests[req_id]
            tokens = req.all_token_ids + ([self.in_flight[req_id]] if req.num_output_placeholders > 1 else [])
            blocks = self.sched.kv.get_block_ids(req_id)
            computed = req.num_computed_tokens - n   # schedule() counted this step already
            held = [self.gpu[blocks[p // BS]][p % BS] for p in range(computed)]
            assert held == tokens[:computed], f"{req_id}: KV of its computed tokens is wrong"
            for p in range(computed, computed + n):
                self.gpu[blocks[p // BS]][p % BS] = tokens[p]
            if computed + n == len(tokens):
                self.in_flight[req_id] = int(self.rng.integers(3, 10_000))
                runner_out.sampled_token_ids[req_id] = [self.in_flight[req_id]]
        return runner_out


def make(mode="recompute", num_blocks=24, num_swap=0, num_cpu=0, num_disk=0, budget=32, max_num_seqs=8):
    sizes = TierSizes(block_bytes=100, num_swap_slots=num_swap, num_cpu_slots=num_cpu, num_disk_blocks=num_disk)
    offload = KVOffloadManager(BS, mode, True, sizes)
    kv = KVCacheManager(num_blocks, BS, offload.on_gpu_evict)
    sched = Scheduler(kv, max_num_seqs, budget, 512, offload)
    return sched, offload


def add_requests(sched, num, rng, shared_prefixes, max_tokens=12, start=0):
    for i in range(start, start + num):
        prefix = shared_prefixes[i % len(shared_prefixes)]
        prompt = prefix + rng.integers(3, 10_000, size=int(rng.integers(1, 10))).tolist()
        sched.add_request(Request(str(i), prompt, SamplingParams(ignore_eos=True), max_tokens, BS))


def run(sched, runner, max_steps=3000):
    """As the engine steps: step N+1 is scheduled and run before step N's tokens are applied."""
    in_flight = None
    for _ in range(max_steps):
        if not sched.has_unfinished_requests() and in_flight is None:
            return
        launched = None
        if sched.has_unfinished_requests():
            out = sched.schedule()
            launched = (out, runner.execute(out))
        if in_flight is not None:
            sched.update_from_output(*in_flight)
        in_flight = launched
    raise AssertionError("did not finish")


def assert_no_leaks(sched, offload, runner):
    assert sched.kv.num_free_blocks == sched.kv.pool.num_blocks
    assert offload.swap_pool.num_free_blocks == offload.swap_pool.num_blocks
    assert offload.cpu_pool.num_free_blocks == offload.cpu_pool.num_blocks   # nothing pinned
    assert not offload.swapped and not offload._reading and not offload._read_req_ids
    if offload.disk is not None:
        assert set(offload.disk.lru) == set(runner.disk)
        assert runner.max_disk_files <= offload.disk.capacity


@pytest.mark.parametrize("mode,num_swap,num_cpu,num_disk", [
    ("recompute", 0, 0, 0), ("swap", 64, 0, 0), ("swap", 6, 0, 0), ("swap", 64, 10, 0),
    ("recompute", 0, 10, 0), ("recompute", 0, 3, 12), ("offload", 0, 10, 20), ("offload", 0, 4, 10)])
def test_every_request_finds_its_kv_after_preemption_and_tier_loads(mode, num_swap, num_cpu, num_disk):
    rng = np.random.default_rng(1)
    prefixes = [rng.integers(3, 10_000, size=n).tolist() for n in (9, 13, 17, 11, 15, 19)]
    sched, offload = make(mode, num_blocks=20, num_swap=num_swap, num_cpu=num_cpu, num_disk=num_disk)
    runner = SymbolicRunner(sched, 20, num_swap + num_cpu)
    add_requests(sched, 12, rng, prefixes)
    run(sched, runner)
    add_requests(sched, 12, rng, prefixes, start=12)   # a second round finds the prefixes in the tiers
    run(sched, runner)
    assert sched.num_preemptions > 0
    stats = sched.make_stats().kv_tiers
    if mode == "swap":
        assert stats["swap"].hits > 0
    if num_cpu:
        assert stats["cpu"].hits > 0
    if num_disk:
        assert stats["disk"].hits > 0
    assert_no_leaks(sched, offload, runner)


def test_failed_disk_reads_are_recomputed_and_counted():
    rng = np.random.default_rng(2)
    prefixes = [rng.integers(3, 10_000, size=n).tolist() for n in (17, 21, 25, 29)]
    sched, offload = make("recompute", num_blocks=16, num_cpu=3, num_disk=40)
    runner = SymbolicRunner(sched, 16, 3, corrupt_every=3)
    for round_ in range(3):
        add_requests(sched, 8, rng, prefixes, start=8 * round_)
        run(sched, runner)
    disk = sched.make_stats().kv_tiers["disk"]
    assert disk.hits > 0 and disk.invalid > 0 and disk.misses >= disk.invalid
    assert_no_leaks(sched, offload, runner)


def test_swap_pool_full_falls_back_to_recompute(caplog):
    rng = np.random.default_rng(3)
    sched, offload = make("swap", num_blocks=12, num_swap=2)
    runner = SymbolicRunner(sched, 12, 2)
    add_requests(sched, 6, rng, [rng.integers(3, 10_000, size=20).tolist()])
    with caplog.at_level("WARNING", logger="pagedllm"):
        run(sched, runner)
    assert sched.make_stats().kv_tiers["swap"].misses > 0
    assert sum("falls back to recompute" in r.message for r in caplog.records) == 1   # once a minute at most
    assert_no_leaks(sched, offload, runner)


def test_reset_forgets_the_cpu_and_disk_tiers_but_keeps_swapped_kv():
    rng = np.random.default_rng(4)
    prefixes = [rng.integers(3, 10_000, size=n).tolist() for n in (17, 21, 25)]
    sched, offload = make("swap", num_blocks=12, num_swap=64, num_cpu=4, num_disk=40)
    runner = SymbolicRunner(sched, 12, 68)
    add_requests(sched, 6, rng, prefixes)
    run(sched, runner)
    assert offload.cpu_pool.cached_blocks and offload.disk.lru
    # Step (pipelined) until a preempted request waits in the swap pool, then abort the running ones.
    add_requests(sched, 6, rng, prefixes, start=6)
    in_flight = None
    while not offload.swapped:
        out = sched.schedule()
        launched = (out, runner.execute(out))
        if in_flight is not None:
            sched.update_from_output(*in_flight)
        in_flight = launched
    sched.update_from_output(*in_flight)
    sched.finish_requests([r.request_id for r in list(sched.running)], RequestStatus.FINISHED_ABORTED)
    swapped = {req_id: list(slots) for req_id, (slots, _) in offload.swapped.items()}
    assert sched.kv.num_used_blocks == 0 and not offload._reading

    assert offload.reset_prefix_cache()
    assert not offload.cpu_pool.cached_blocks and not offload.disk.lru
    assert all(b.block_hash is None for b in offload.cpu_pool.blocks)
    assert {req_id: list(slots) for req_id, (slots, _) in offload.swapped.items()} == swapped
    runner.disk.clear()   # what KVOffload.clear_disk does to the files
    hits = sched.make_stats().kv_tiers["swap"].hits
    run(sched, runner)    # the swapped requests resume from their slots, with their KV checked
    assert sched.make_stats().kv_tiers["swap"].hits > hits
    assert_no_leaks(sched, offload, runner)


def test_reset_is_refused_while_a_tier_slot_is_pinned():
    rng = np.random.default_rng(5)
    sched, offload = make("recompute", num_blocks=12, num_cpu=4, num_disk=40)
    runner = SymbolicRunner(sched, 12, 4)
    add_requests(sched, 8, rng, [rng.integers(3, 10_000, size=n).tolist() for n in (17, 21)])
    run(sched, runner)
    slot = next(iter(offload.cpu_pool.cached_blocks.values()))
    offload.cpu_pool.touch([slot])   # pinned, as a lookup or a step's copy pins it
    assert not offload.reset_prefix_cache()
    assert slot.block_hash is not None and offload.disk.lru   # nothing was forgotten
    offload.cpu_pool.free_blocks([slot])
    assert offload.reset_prefix_cache() and slot.block_hash is None and not offload.disk.lru


def test_disk_index_evicts_least_recently_used_first():
    disk = make("recompute", num_cpu=2, num_disk=3)[1].disk
    for h in (b"a", b"b", b"c"):
        assert disk.add(h) == []
    disk.touch(b"a")
    assert disk.add(b"d") == [b"b"] and list(disk.lru) == [b"c", b"a", b"d"]


@pytest.mark.parametrize("kwargs,message", [
    ({"preemption_mode": "drop"}, "preemption_mode must be one of"),
    ({"preemption_mode": "swap", "swap_space": 0}, "swap_space must be > 0 GiB"),
    ({"kv_offloading_size": 0}, "kv_offloading_size must be > 0 GiB, or None"),
    ({"kv_disk_gb": 0}, "kv_disk_gb must be > 0"),
    ({"preemption_mode": "offload"}, "kv_disk_dir must be set"),
    ({"kv_disk_dir": "/tmp/x"}, "kv_offloading_size must be set when kv_disk_dir is set"),
    ({"kv_offloading_size": 1.0, "kv_offloading_backend": "lmcache"}, "kv_offloading_backend must be one of"),
])
def test_config_names_the_kv_tier_field_and_its_limit(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**kwargs)
