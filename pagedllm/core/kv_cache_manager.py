"""KVCacheManager: the one allocation path for prefill, chunked prefill and decode, plus prefix caching."""
from dataclasses import dataclass

from pagedllm.core.block_pool import NULL_BLOCK, BlockPool, KVCacheBlock, cdiv
from pagedllm.core.kv_fork import KVForks
from pagedllm.request import Request


# Keys an attention kernel may read before a window's first: its key tiles are aligned (Triton's widest, the fp8
# decode tile, is 128 keys), so the tile that holds the window's first key can start up to 127 keys before it.
WINDOW_READ_SLACK = 128


@dataclass
class PrefixCacheStats:
    queries: int = 0   # tokens looked up
    hits: int = 0      # tokens found


class KVCacheManager:
    """Every full block is hashed. Prefix caching "off" is a per-request salt in the hashes (see Request),
    so this class has no off switch.

    sliding_window: every layer of the model attends within it (Mistral-7B-v0.1, Phi-3-mini-4k). A request's
    blocks wholly before what its next step can read are then freed (NULL_BLOCK takes their place in its list):
    it holds about window / block_size blocks however long it runs. Freed full blocks stay in the prefix cache
    until evicted, as any freed block."""

    def __init__(self, num_blocks: int, block_size: int, on_evict=None, sliding_window: int | None = None):
        self.block_size = block_size
        self.sliding_window = sliding_window
        # The earliest query position of each request's last scheduled step, and its blocks freed so far.
        self.last_query_start: dict[str, int] = {}
        self.num_freed_blocks: dict[str, int] = {}
        self.pool = BlockPool(num_blocks, on_evict)   # on_evict: the CPU tier keeps evicted blocks' KV
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        self.num_cached_blocks: dict[str, int] = {}   # leading blocks of a request already named by hash
        self.prefix_stats = PrefixCacheStats()
        # Slots in the requests' blocks that hold no token (see core/kv_usage.py), kept per request and in
        # total. Only a request's last block can be partly empty, and it is never shared (only full blocks
        # are hashed and hit; a fork copies or takes over its parent's), so summing per request (and per
        # hold) counts each empty slot once.
        self.num_empty_slots = 0
        self.req_to_empty_slots: dict[str, int] = {}
        self.forks = KVForks(self)   # held requests' blocks, forked copy-on-write (beam search)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_blocks - self.pool.num_free_blocks

    def usage(self) -> float:
        return self.pool.usage()

    def get_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, [])]

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """The longest run of leading full blocks whose hashes are cached, and the tokens they hold.
        Capped at num_tokens - 1: the last known token is always recomputed, since its logits are needed."""
        if not request.sampling_params.reads_prefix_cache:
            return [], 0   # prompt logprobs need every prompt position computed; skip_reading_prefix_cache
        max_blocks = (request.num_tokens - 1) // self.block_size
        if self.sliding_window is not None:
            return self._window_hit(request.block_hashes[:max_blocks])
        blocks = []
        for h in request.block_hashes[:max_blocks]:
            block = self.pool.get_cached_block(h)
            if block is None:
                break
            blocks.append(block)
        return blocks, len(blocks) * self.block_size

    def _window_hit(self, hashes) -> tuple[list[KVCacheBlock], int]:
        """With every layer sliding, a hit of h blocks needs only the blocks its next query reads (a block's hash
        names its whole prefix, so a cached block is right without those before it): the longest such h, with
        NULL_BLOCK before them. Freed first, a long request's first blocks are evicted first."""
        found = [self.pool.get_cached_block(h) for h in hashes]
        missing = -1   # the last uncached block at or before each h - 1
        last_missing = []
        for i, block in enumerate(found):
            missing = i if block is None else missing
            last_missing.append(missing)
        for h in range(len(found), 0, -1):
            first = self._first_read_block(h * self.block_size)
            if last_missing[h - 1] < first:
                return [NULL_BLOCK] * first + found[first:h], h * self.block_size
        return [], 0

    def record_prefix_lookup(self, request: Request, num_hit_tokens: int):
        """Counted once per admission (a request that waits is looked up again next step). As vLLM's counters:
        not a preempted request's readmission, nor one that does not read the cache (prompt logprobs)."""
        if request.num_preemptions or not request.sampling_params.reads_prefix_cache:
            return
        self.prefix_stats.queries += request.num_tokens
        self.prefix_stats.hits += num_hit_tokens

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: list[KVCacheBlock] = (),
                       num_new_computed_tokens: int = 0) -> list[KVCacheBlock] | None:
        """Make room for num_new_tokens more tokens of `request`; None if the free blocks cannot cover it.

        Token layout of the request (known tokens = prompt + outputs so far):

          |<- num_computed_tokens ->|<- num_new_computed_tokens ->|<-- num_new_tokens -->|
          |   already in its blocks |  prefix-cache hit: blocks   |  computed this step  |
          |                         |  shared, nothing computed   |                      |
          |<------------- blocks needed: cdiv(sum of the three, block_size) ------------->|

        Blocks that become full with this step are hashed into the prefix cache now: their K/V is written
        in this step's forward before any attention reads it, so a request scheduled in the same step
        (a sibling of n > 1) may already share them.
        """
        blocks = self.req_to_blocks.setdefault(request.request_id, [])
        if self.sliding_window is not None:
            self._free_out_of_window(request, blocks, request.num_computed_tokens + num_new_computed_tokens)
        num_total = request.num_computed_tokens + num_new_computed_tokens + num_new_tokens
        num_new_blocks = cdiv(num_total, self.block_size) - len(blocks) - len(new_computed_blocks)
        # Hit blocks that sit in the free queue stop being free once touched.
        num_free_hits = sum(1 for b in new_computed_blocks if b.ref_cnt == 0 and b is not NULL_BLOCK)
        if num_new_blocks > self.pool.num_free_blocks - num_free_hits:
            return None

        self.pool.touch(list(new_computed_blocks))
        blocks.extend(new_computed_blocks)
        new_blocks = self.pool.get_new_blocks(max(num_new_blocks, 0))
        blocks.extend(new_blocks)
        self._cache_full_blocks(request, blocks, num_total)
        num_empty = len(blocks) * self.block_size - num_total   # inline: once per scheduled request
        self.num_empty_slots += num_empty - self.req_to_empty_slots.get(request.request_id, 0)
        self.req_to_empty_slots[request.request_id] = num_empty
        return new_blocks

    def _free_out_of_window(self, request: Request, blocks: list[KVCacheBlock], query_start: int):
        """Free the blocks that neither this step nor the last one reads. The last step may still be running
        (asynchronous scheduling) and, with speculation, this step's queries may start a few positions later
        than its tokens' rollback allows; the last step's first query is the lower bound of both."""
        rid = request.request_id
        last = self.last_query_start.get(rid)
        self.last_query_start[rid] = query_start
        if last is None:
            return
        start, end = self.num_freed_blocks.get(rid, 0), min(self._first_read_block(min(last, query_start)), len(blocks))
        if end <= start:
            return
        self.pool.free_blocks(reversed(blocks[start:end]))
        blocks[start:end] = [NULL_BLOCK] * (end - start)
        self.num_freed_blocks[rid] = end
        # never hashed now: a block not yet named (its hash not known then) is gone
        self.num_cached_blocks[rid] = max(self.num_cached_blocks.get(rid, 0), end)

    def _first_read_block(self, query_start: int) -> int:
        """The first block a query at query_start (or later) may read: its window and a kernel tile before it."""
        return max(query_start - self.sliding_window + 1 - WINDOW_READ_SLACK, 0) // self.block_size

    def _cache_full_blocks(self, request: Request, blocks: list[KVCacheBlock], num_tokens: int):
        start = self.num_cached_blocks.get(request.request_id, 0)
        end = min(num_tokens // self.block_size, len(request.block_hashes))
        if end > start:
            self.pool.cache_full_blocks(blocks[start:end], request.block_hashes[start:end])
            self.num_cached_blocks[request.request_id] = end

    def take_blocks(self, rid: str) -> list[KVCacheBlock]:
        """The request's blocks, its bookkeeping gone (free, or a hold keeping them)."""
        self.num_cached_blocks.pop(rid, None)
        self.last_query_start.pop(rid, None)
        self.num_freed_blocks.pop(rid, None)
        return self.req_to_blocks.pop(rid, [])

    def free(self, request: Request, uncache: bool = False):
        """uncache: the blocks no other request holds leave the prefix cache (see BlockPool.free_blocks)."""
        blocks = self.take_blocks(request.request_id)
        self.num_empty_slots -= self.req_to_empty_slots.pop(request.request_id, 0)
        self.pool.free_blocks(reversed(blocks), uncache)

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()
