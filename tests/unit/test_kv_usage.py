"""KV memory accounting (core/kv_usage.py) on fake sizes: hand-made cases, and the O(1) running count
against a recount from the definition over a random run with chunking, prefix hits, preemption and aborts."""
import random

from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.messages import ModelRunnerOutput
from pagedllm.core.scheduler import Scheduler
from pagedllm.request import Request, RequestStatus
from pagedllm.sampling_params import SamplingParams


def make_scheduler(num_blocks, block_size, budget=1024, max_num_seqs=64):
    return Scheduler(KVCacheManager(num_blocks, block_size), max_num_seqs, budget, max_model_len=4096)


def add(sched, req_id, token_ids, max_tokens=4):
    sched.add_request(Request(req_id, list(token_ids), SamplingParams(ignore_eos=True), max_tokens,
                              sched.kv.block_size))


def fake_runner(sched, sched_out):
    out = ModelRunnerOutput()
    for req_id, n in sched_out.num_scheduled_tokens.items():
        req = sched.requests[req_id]
        if req.num_computed_tokens == req.num_tokens:   # the step reached the end: it samples
            out.sampled_token_ids[req_id] = [7]
    return out


def test_waste_of_two_requests_17_and_5_tokens_block_size_16():
    sched = make_scheduler(num_blocks=8, block_size=16)
    add(sched, "a", range(17))
    add(sched, "b", range(100, 105))
    sched_out = sched.schedule()
    stats = sched.make_stats()
    # a: 2 blocks, b: 1 block -> 48 slots holding 22 tokens
    assert (stats.peak_blocks, stats.peak_running) == (3, 2)
    assert stats.kv_waste_at_peak == (48 - 22) / 48
    # Next step: 18 and 6 tokens in the same 3 blocks; the peak stays the first step with 3 blocks.
    sched.update_from_output(sched_out, fake_runner(sched, sched_out))
    sched.schedule()
    assert sched.kv.num_empty_slots == 48 - 24
    assert sched.make_stats().kv_waste_at_peak == (48 - 22) / 48


def test_a_shared_block_counts_once():
    sched = make_scheduler(num_blocks=8, block_size=16)
    add(sched, "a", range(17))
    add(sched, "b", range(17))      # same prompt: b hits a's first block in the same step
    sched.schedule()
    stats = sched.make_stats()
    # blocks: shared [0..15], a's [16], b's [16] -> 3 blocks, 48 slots, 16 + 1 + 1 tokens
    assert stats.peak_blocks == 3 and stats.kv_waste_at_peak == (48 - 18) / 48


def test_peak_is_the_step_with_most_blocks_and_reset_restarts_it():
    sched = make_scheduler(num_blocks=16, block_size=4)
    add(sched, "a", range(8), max_tokens=1)      # 2 full blocks
    sched_out = sched.schedule()
    sched.update_from_output(sched_out, fake_runner(sched, sched_out))   # a finishes
    add(sched, "b", range(50, 53), max_tokens=1)  # 1 block, 1 empty slot
    sched.schedule()
    stats = sched.make_stats()
    assert (stats.peak_blocks, stats.kv_waste_at_peak, stats.peak_running) == (2, 0.0, 1)
    sched.kv_peak.reset()
    sched.schedule()
    stats = sched.make_stats()
    assert (stats.peak_blocks, stats.kv_waste_at_peak, stats.peak_running) == (1, 1 / 4, 1)


def recount_empty_slots(sched):
    """From the definition: for each block in use, the slots no running request fills this step (its
    num_computed_tokens counts the step's tokens once it is scheduled)."""
    bs = sched.kv.block_size
    filled: dict[int, int] = {}
    for req in sched.running:
        num_tokens = req.num_computed_tokens
        for i, block in enumerate(sched.kv.req_to_blocks[req.request_id]):
            filled[block.block_id] = max(filled.get(block.block_id, 0), min(bs, max(num_tokens - i * bs, 0)))
    in_use = {b.block_id for b in sched.kv.pool.blocks if b.ref_cnt > 0}
    assert set(filled) == in_use          # every block in use belongs to a running request
    return sum(bs - n for n in filled.values())


def test_running_count_matches_recount_over_a_random_run():
    rng = random.Random(0)
    sched = make_scheduler(num_blocks=40, block_size=4, budget=24, max_num_seqs=8)
    prefixes = [[rng.randrange(1000) for _ in range(rng.randrange(1, 14))] for _ in range(3)]
    num_checked = 0
    for step in range(400):
        if step < 300 and rng.random() < 0.3:
            tail = [rng.randrange(1000) for _ in range(rng.randrange(1, 10))]
            add(sched, f"r{step}", rng.choice(prefixes) + tail, max_tokens=rng.randrange(1, 30))
        if sched.running and rng.random() < 0.05:
            sched.finish_requests([rng.choice(sched.running).request_id], RequestStatus.FINISHED_ABORTED)
        sched_out = sched.schedule()
        assert sched.kv.num_empty_slots == recount_empty_slots(sched)
        num_checked += bool(sched.running)
        sched.update_from_output(sched_out, fake_runner(sched, sched_out))
    assert not sched.has_unfinished_requests() and sched.kv.num_empty_slots == 0
    assert num_checked > 200 and sched.num_preemptions > 0 and sched.kv.prefix_stats.hits > 0
    stats = sched.make_stats()
    assert 0 < stats.peak_blocks <= 40 and 0 < stats.kv_waste_at_peak < 1 and stats.peak_running <= 8
