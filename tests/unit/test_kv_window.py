"""Blocks before every layer's sliding window are freed (KVCacheManager's sliding_window), on the scheduler with
a fake runner: what a request holds stays bounded however long it runs, freed blocks stay in the prefix cache,
nothing leaks, and preemption never stores a freed block."""
from pagedllm.core.block_pool import NULL_BLOCK
from pagedllm.core.kv_cache_manager import WINDOW_READ_SLACK, KVCacheManager
from pagedllm.core.offload import KVOffloadManager, TierSizes
from pagedllm.core.scheduler import Scheduler
from pagedllm.request import Request
from pagedllm.sampling_params import SamplingParams

from test_scheduler import step

BS, WINDOW = 4, 8


def make(num_blocks=200, window=WINDOW, budget=64, offload=None, max_model_len=1024):
    kv = KVCacheManager(num_blocks, BS, offload and offload.on_gpu_evict, sliding_window=window)
    return Scheduler(kv, 8, budget, max_model_len, offload)


def add(sched, rid, prompt_len, max_tokens, first=0):
    req = Request(rid, [first + i for i in range(prompt_len)], SamplingParams(ignore_eos=True), max_tokens, BS)
    sched.add_request(req)
    return req


def held(sched, rid) -> int:
    return sum(b is not NULL_BLOCK for b in sched.kv.req_to_blocks[rid])


def most_held(window: int) -> int:
    """This step's and the last one's reads (one decode token apart), a kernel's tile before them, the new token."""
    return -(-(window + WINDOW_READ_SLACK + 2) // BS) + 1


def test_a_long_decode_holds_a_window_of_blocks_and_frees_all_at_the_end():
    sched = make()
    add(sched, "a", 20, 300)
    peak = 0
    while sched.has_unfinished_requests():
        step(sched)
        if "a" in sched.kv.req_to_blocks:
            peak = max(peak, held(sched, "a"))
            ids = sched.kv.get_block_ids("a")
            n = sched.kv.num_freed_blocks.get("a", 0)
            assert ids[:n] == [0] * n and all(b is not NULL_BLOCK for b in sched.kv.req_to_blocks["a"][n:])
    assert WINDOW // BS < peak <= most_held(WINDOW)   # 320 tokens would take 80 blocks
    assert sched.kv.num_free_blocks == 200 and NULL_BLOCK.ref_cnt == 0


def test_blocks_are_freed_only_once_neither_this_step_nor_the_last_reads_them():
    """64-token chunks of a 600-token prompt: each step frees what the last step's first query could not read."""
    sched = make()
    req = add(sched, "a", 600, 4)
    last_start, freed = None, []
    while req.num_computed_tokens < 600:
        start = req.num_computed_tokens
        step(sched)
        first_read = -1 if last_start is None else last_start - WINDOW + 1 - WINDOW_READ_SLACK
        assert sched.kv.num_freed_blocks.get("a", 0) == max(first_read, 0) // BS
        freed.append(sched.kv.num_freed_blocks.get("a", 0))
        last_start = start
    assert freed == [0, 0, 0, 0, 14, 30, 46, 62, 78, 94]


def test_freed_full_blocks_stay_in_the_prefix_cache():
    sched = make(budget=32)
    add(sched, "a", 300, 2)
    while sched.has_unfinished_requests():
        step(sched)
    b = add(sched, "b", 300, 2)              # the same prompt: every full block but the last token's is found
    hit, num_hit = sched.kv.get_computed_blocks(b)
    assert num_hit == 296 and len(hit) == 74


def test_without_a_window_nothing_is_freed():
    sched = make(window=None)
    add(sched, "a", 20, 300)
    while sched.has_unfinished_requests():
        step(sched)
        if "a" in sched.kv.req_to_blocks:
            assert NULL_BLOCK not in sched.kv.req_to_blocks["a"]


def test_requests_that_fit_only_because_of_the_window_run_without_preemption():
    """Four 600-token decodes in what four windows hold: 600 blocks without the window."""
    num_blocks = 4 * most_held(WINDOW)
    sched = make(num_blocks=num_blocks, max_model_len=2048)
    for i in range(4):
        add(sched, f"r{i}", 10, 590, first=1000 * i)
    for _ in range(700):   # without the window, preempted requests recompute and it runs much longer
        step(sched)
    assert not sched.has_unfinished_requests() and sched.num_preemptions == 0 and sched.kv.num_free_blocks == num_blocks


def test_preemption_stores_no_freed_block():
    """Offload mode writes a preempted request's full blocks to disk by hash: never a freed one (block 0 holds
    another request's KV then). Swap mode falls back to recompute for it."""
    for mode in ("offload", "swap"):
        offload = KVOffloadManager(BS, mode, True, TierSizes(block_bytes=1, num_swap_slots=100, num_cpu_slots=0,
                                                                 num_disk_blocks=100))
        sched = make(offload=offload)
        req = add(sched, "a", 20, 300)
        for _ in range(250):
            step(sched)
        freed = sched.kv.num_freed_blocks["a"]
        assert freed > 0
        live = [b.block_id for b in sched.kv.req_to_blocks["a"][freed:req.num_computed_tokens // BS]]
        sched.offload.take_ops()
        sched._preempt(sched.running.pop())
        ops = sched.offload.take_ops()
        if mode == "offload":
            assert [op.gpu_block for op in ops.disk_ops if op.gpu_block is not None] == live
        else:
            assert not ops.swap_out and offload.stats["swap"].misses == 1


def test_a_prompt_whose_first_blocks_were_evicted_still_hits_its_window():
    """Freed first, a finished request's first blocks are evicted first: the lookup finds the last blocks whose
    reads the next query needs (NULL_BLOCK before them), not a chain from the first block."""
    sched = make(num_blocks=120, budget=32)
    add(sched, "a", 300, 2)
    while sched.has_unfinished_requests():
        step(sched)
    sched.kv.pool.get_new_blocks(sched.kv.num_free_blocks - 40)   # the free queue's head: a's first blocks
    b = add(sched, "b", 300, 2)
    hit, num_hit = sched.kv.get_computed_blocks(b)
    first = (296 - WINDOW + 1 - WINDOW_READ_SLACK) // BS
    assert num_hit == 296 and len(hit) == 74 and hit[:first] == [NULL_BLOCK] * first
    assert all(blk is not NULL_BLOCK and blk.block_hash == h for blk, h in zip(hit[first:], b.block_hashes[first:]))
    kv = KVCacheManager(120, BS)   # without a window: the chain stops at the first evicted block
    kv.pool = sched.kv.pool
    assert kv.get_computed_blocks(b) == ([], 0)
    out, _ = step(sched)   # admitted on the hit: only its last token is computed
    assert out.num_scheduled_tokens == {"b": 4} and b.num_computed_tokens == 300
