"""KVCacheManager: the one allocation path for prefill, chunked prefill and decode, plus prefix caching."""
from dataclasses import dataclass

from pagedllm.core.block_pool import BlockPool, KVCacheBlock, cdiv
from pagedllm.core.kv_fork import KVForks
from pagedllm.request import Request


@dataclass
class PrefixCacheStats:
    queries: int = 0   # tokens looked up
    hits: int = 0      # tokens found


class KVCacheManager:
    """Every full block is hashed. Prefix caching "off" is a per-request salt in the hashes (see Request),
    so this class has no off switch."""

    def __init__(self, num_blocks: int, block_size: int, on_evict=None):
        self.block_size = block_size
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
        blocks = []
        for h in request.block_hashes[:max_blocks]:
            block = self.pool.get_cached_block(h)
            if block is None:
                break
            blocks.append(block)
        return blocks, len(blocks) * self.block_size

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
        num_total = request.num_computed_tokens + num_new_computed_tokens + num_new_tokens
        num_new_blocks = cdiv(num_total, self.block_size) - len(blocks) - len(new_computed_blocks)
        # Hit blocks that sit in the free queue stop being free once touched.
        num_free_hits = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
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

    def _cache_full_blocks(self, request: Request, blocks: list[KVCacheBlock], num_tokens: int):
        start = self.num_cached_blocks.get(request.request_id, 0)
        end = min(num_tokens // self.block_size, len(request.block_hashes))
        if end > start:
            self.pool.cache_full_blocks(blocks[start:end], request.block_hashes[start:end])
            self.num_cached_blocks[request.request_id] = end

    def free(self, request: Request, uncache: bool = False):
        """uncache: the blocks no other request holds leave the prefix cache (see BlockPool.free_blocks)."""
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self.num_cached_blocks.pop(request.request_id, None)
        self.num_empty_slots -= self.req_to_empty_slots.pop(request.request_id, 0)
        self.pool.free_blocks(reversed(blocks), uncache)

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()
