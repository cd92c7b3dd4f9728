"""Block pool and KV cache manager on fake sizes, no model."""
import pytest

from pagedllm.core.block_pool import BlockPool, FreeBlockQueue, KVCacheBlock
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.request import Request
from pagedllm.sampling_params import SamplingParams

BS = 4


def make_request(req_id, token_ids, **params):
    return Request(req_id, list(token_ids), SamplingParams(**params), max_tokens=16, block_size=BS)


def test_free_queue_append_remove_popleft_in_o1_order():
    blocks = [KVCacheBlock(i) for i in range(5)]
    q = FreeBlockQueue(blocks)
    assert q.block_ids() == [0, 1, 2, 3, 4]
    q.remove(blocks[2])
    q.remove(blocks[0])
    assert q.block_ids() == [1, 3, 4] and q.num_free_blocks == 3
    q.append(blocks[0])
    q.appendleft(blocks[2])
    assert q.block_ids() == [2, 1, 3, 4, 0]
    assert [q.popleft().block_id for _ in range(5)] == [2, 1, 3, 4, 0]
    with pytest.raises(ValueError):
        q.popleft()


def test_pool_ref_counts_and_lazy_eviction():
    pool = BlockPool(4)
    a, b = pool.get_new_blocks(2)
    assert (a.ref_cnt, b.ref_cnt, pool.num_free_blocks) == (1, 1, 2)
    pool.cache_full_blocks([a], [b"h-a"])
    pool.touch([a])
    assert a.ref_cnt == 2
    pool.free_blocks([b, a])
    assert a.ref_cnt == 1 and pool.num_free_blocks == 3
    pool.free_blocks([a])
    # a is free but still findable: lazy eviction
    assert pool.get_cached_block(b"h-a") is a and pool.num_free_blocks == 4
    # uncached b went to the front, cached a to the back: b, c, d are reused before a
    assert pool.free_queue.block_ids()[0] == b.block_id and pool.free_queue.block_ids()[-1] == a.block_id
    pool.get_new_blocks(3)
    assert pool.get_cached_block(b"h-a") is a
    (again,) = pool.get_new_blocks(1)
    assert again is a and a.block_hash is None and pool.get_cached_block(b"h-a") is None
    with pytest.raises(ValueError):
        pool.get_new_blocks(1)


def test_touching_a_free_cached_block_takes_it_out_of_the_free_queue():
    pool = BlockPool(3)
    (a,) = pool.get_new_blocks(1)
    pool.cache_full_blocks([a], [b"x"])
    pool.free_blocks([a])
    assert pool.num_free_blocks == 3
    pool.touch([a])
    assert pool.num_free_blocks == 2 and a.block_id not in pool.free_queue.block_ids()


def test_allocate_slots_prefill_chunk_and_decode():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    req = make_request("r", range(10))               # 10 tokens: 2 full blocks + 2
    assert len(kv.allocate_slots(req, 6)) == 2        # chunk of 6 -> blocks for tokens 0..5
    req.num_computed_tokens = 6
    assert len(kv.allocate_slots(req, 4)) == 1        # rest of the prompt -> 3 blocks in all
    req.num_computed_tokens = 10
    assert kv.num_free_blocks == 7
    req.append_output_token_id(99)
    assert kv.allocate_slots(req, 1) == []            # token 10 fits in block 2
    req.num_computed_tokens = 11
    for t in range(1, 2):
        req.append_output_token_id(t)
    assert kv.allocate_slots(req, 1) == []            # token 11 fills block 2
    req.num_computed_tokens = 12
    req.append_output_token_id(7)
    assert len(kv.allocate_slots(req, 1)) == 1        # token 12 needs block 3
    assert len(kv.get_block_ids("r")) == 4
    kv.free(req)
    assert kv.num_free_blocks == 10


def test_allocate_slots_returns_none_when_out_of_blocks():
    kv = KVCacheManager(num_blocks=3, block_size=BS)
    a = make_request("a", range(8))
    assert kv.allocate_slots(a, 8) is not None
    b = make_request("b", range(100, 108))
    assert kv.allocate_slots(b, 8) is None            # needs 2, 1 free
    assert kv.num_free_blocks == 1 and kv.get_block_ids("b") == []
    assert kv.allocate_slots(b, 4) is not None        # a smaller chunk fits


def test_prefix_hit_full_blocks_only_and_last_token_recomputed():
    kv = KVCacheManager(num_blocks=20, block_size=BS)
    a = make_request("a", range(12))
    kv.allocate_slots(a, 12)
    a.num_computed_tokens = 12
    # Same 12 tokens: 3 full blocks cached, but the last token must be recomputed -> 2 blocks hit.
    b = make_request("b", range(12))
    blocks, n = kv.get_computed_blocks(b)
    assert n == 8 and [x.block_id for x in blocks] == kv.get_block_ids("a")[:2]
    # Longer prompt sharing 2 blocks then diverging inside the third.
    c = make_request("c", list(range(10)) + [500, 501, 502, 503])
    blocks, n = kv.get_computed_blocks(c)
    assert n == 8
    kv.allocate_slots(c, 14 - n, blocks, n)
    assert kv.get_block_ids("c")[:2] == kv.get_block_ids("a")[:2]
    assert [kv.pool.blocks[i].ref_cnt for i in kv.get_block_ids("a")] == [2, 2, 1]
    kv.free(a)
    kv.free(c)
    assert kv.num_free_blocks == 20


def test_prefix_hit_survives_free_until_evicted_lru():
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    a = make_request("a", range(9))                   # 2 full blocks (cached) + 1
    kv.allocate_slots(a, 9)
    a_blocks = kv.get_block_ids("a")
    kv.free(a)
    b = make_request("b", range(9))
    blocks, n = kv.get_computed_blocks(b)
    assert n == 8 and [x.block_id for x in blocks] == a_blocks[:2]
    # Fill the cache with other requests: the freed cached blocks are evicted last, tail block first.
    other = make_request("o", range(1000, 1016))
    kv.allocate_slots(other, 16)                      # takes 4 blocks: the 3 never-cached + a's partial one
    assert kv.get_computed_blocks(b)[1] == 8
    other2 = make_request("o2", range(2000, 2004))
    kv.allocate_slots(other2, 4)                      # evicts a's block 1 (tail of the prefix) first
    assert kv.get_computed_blocks(b)[1] == 4
    assert kv.pool.get_cached_block(b.block_hashes[1]) is None
    assert kv.pool.get_cached_block(b.block_hashes[0]) is not None


def test_prompt_logprobs_disable_prefix_hits():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = make_request("a", range(9))
    kv.allocate_slots(a, 9)
    assert kv.get_computed_blocks(make_request("b", range(9), prompt_logprobs=1)) == ([], 0)
    assert kv.get_computed_blocks(make_request("c", range(9)))[1] == 8


def test_allocation_counts_free_cached_hits_as_used():
    # 4 blocks; a cached 2-block prefix sits free. A request hitting it and needing 2 more new blocks fits
    # exactly (hits leave the free queue, so only 2 are free for new blocks).
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_request("a", range(8))
    kv.allocate_slots(a, 8)
    kv.free(a)
    b = make_request("b", list(range(8)) + list(range(50, 58)) + [1])
    blocks, n = kv.get_computed_blocks(b)
    assert n == 8
    assert kv.allocate_slots(b, 9, blocks, n) is None          # needs 3 new, only 2 left after the hit
    assert kv.allocate_slots(b, 8, blocks, n) is not None      # 2 new fit
    assert kv.num_free_blocks == 0


def test_same_prefix_in_two_blocks_keeps_one_in_map():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a, b = make_request("a", range(5)), make_request("b", range(5))
    kv.allocate_slots(a, 5)
    kv.allocate_slots(b, 5)      # no lookup: computes its own copy
    assert len(kv.pool.cached_blocks) == 1
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == 8


def test_cache_salt_separates_prefixes_and_chains_through():
    """Prefix caching off = a salt per user request: other requests miss, equal salts (siblings) hit."""
    def request(salt):
        return Request("x", list(range(12)), SamplingParams(), 4, BS, cache_salt=salt)

    def hashes(salt):
        return request(salt).block_hashes
    assert hashes(None) == hashes(None) and hashes("a") == hashes("a")
    assert all(x != y for x, y in zip(hashes("a"), hashes("b")))    # the first block's salt reaches every hash
    assert all(x != y for x, y in zip(hashes("a"), hashes(None)))
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    kv.allocate_slots(request("a"), 12)
    assert kv.get_computed_blocks(request("b"))[1] == 0 and kv.get_computed_blocks(request(None))[1] == 0
    assert kv.get_computed_blocks(request("a"))[1] == 8


def test_block_hashes_are_sha256_of_the_chain_however_the_tokens_arrive():
    """The definition, pinned (the disk tier keys files on these hashes across processes and versions): block i
    is sha256(hash of block i-1, or b"root" | its tokens as int64 | repr of the salt on block 0)."""
    import hashlib
    from array import array
    tokens = [7, 70000, 3, 2**40, 5, 6, 7, 8, 9, 10]
    want, parent = [], b"root"
    for i in range(len(tokens) // BS):
        data = array("q", tokens[i * BS:(i + 1) * BS]).tobytes() + (repr(("s",)).encode() if i == 0 else b"")
        parent = hashlib.sha256(parent + data).digest()
        want.append(parent)
    whole = Request("x", tokens, SamplingParams(), 4, BS, cache_salt="s")
    grown = Request("y", tokens[:1], SamplingParams(), 12, BS, cache_salt="s")
    for t in tokens[1:]:          # decode: one token at a time
        grown.append_output_token_id(t)
    assert whole.block_hashes == grown.block_hashes == want


def test_freeing_uncached_drops_unshared_blocks_from_the_prefix_cache():
    """A failed step's blocks may never have been written: freed with uncache, a block no other request
    holds loses its hash (never hit, never handed to on_evict for the CPU tier); a shared one keeps it."""
    evicted = []
    kv = KVCacheManager(8, BS, on_evict=lambda block, h: evicted.append(h))
    a, b = make_request("a", range(9)), make_request("b", range(9))
    kv.allocate_slots(a, 9)                        # blocks 0, 1 full and hashed, 2 partial
    hit, num_hit = kv.get_computed_blocks(b)
    assert num_hit == 8
    kv.allocate_slots(b, 1, hit, num_hit)          # b shares a's two full blocks
    kv.free(a, uncache=True)
    assert kv.get_computed_blocks(make_request("c", range(9)))[1] == 8   # still held by b: still cached
    kv.free(b, uncache=True)
    assert kv.get_computed_blocks(make_request("c", range(9)))[1] == 0
    assert not kv.pool.cached_blocks and kv.num_free_blocks == 8
    kv.allocate_slots(make_request("d", range(100, 132)), 32)   # takes every block: nothing to evict
    assert evicted == []
