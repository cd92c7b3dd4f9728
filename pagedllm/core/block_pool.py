"""The pool of KV cache blocks: reference counts, the hash -> block map, and the LRU free queue.

A free block may still hold a cached prefix (it has a block_hash): it stays findable until the pool hands
it out again (lazy eviction). The free queue's head is evicted first:

    head -> [uncached blocks ... | cached blocks, least recently freed ... most recently freed] <- tail

Blocks with no hash hold nothing reusable and go to the front; cached ones go to the back.
"""
from collections.abc import Callable
from dataclasses import dataclass

from pagedllm.core.block_hash import BlockHash


def cdiv(a: int, b: int) -> int:
    """Blocks (of b tokens) that a tokens take."""
    return -(-a // b)


@dataclass(eq=False)
class KVCacheBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None
    prev_free: "KVCacheBlock | None" = None   # links of the free queue; None when not in it
    next_free: "KVCacheBlock | None" = None

    def __repr__(self):
        return f"KVCacheBlock(id={self.block_id}, ref_cnt={self.ref_cnt}, cached={self.block_hash is not None})"


# Stands in a request's block list for a block it no longer needs (it fell out of every layer's sliding window,
# KVCacheManager): the pool skips it. Its id 0 is what block tables then hold there, an entry no kernel reads.
NULL_BLOCK = KVCacheBlock(0)


class FreeBlockQueue:
    """Intrusive doubly-linked list: O(1) append at either end, pop from the front, removal from the middle
    (a prefix-cache hit takes a free cached block back out of the queue)."""

    def __init__(self, blocks: list[KVCacheBlock]):
        self._head = KVCacheBlock(-1)  # sentinels: no None checks at the ends
        self._tail = KVCacheBlock(-1)
        self._head.next_free, self._tail.prev_free = self._tail, self._head
        self.num_free_blocks = 0
        for b in blocks:
            self.append(b)

    def popleft(self) -> KVCacheBlock:
        if self.num_free_blocks == 0:
            raise ValueError("no free blocks")
        block = self._head.next_free
        self.remove(block)
        return block

    def remove(self, block: KVCacheBlock):
        block.prev_free.next_free = block.next_free
        block.next_free.prev_free = block.prev_free
        block.prev_free = block.next_free = None
        self.num_free_blocks -= 1

    def append(self, block: KVCacheBlock):
        self._insert_after(self._tail.prev_free, block)

    def appendleft(self, block: KVCacheBlock):
        self._insert_after(self._head, block)

    def _insert_after(self, prev: KVCacheBlock, block: KVCacheBlock):
        block.prev_free, block.next_free = prev, prev.next_free
        prev.next_free.prev_free = block
        prev.next_free = block
        self.num_free_blocks += 1

    def block_ids(self) -> list[int]:
        """Front to back (tests and debugging)."""
        ids, b = [], self._head.next_free
        while b is not self._tail:
            ids.append(b.block_id)
            b = b.next_free
        return ids


class BlockPool:
    def __init__(self, num_blocks: int, on_evict: Callable[[KVCacheBlock, BlockHash], None] | None = None):
        self.num_blocks = num_blocks
        self.on_evict = on_evict   # told of each cached block handed out again, before it is reused
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached_blocks: dict[BlockHash, KVCacheBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free_blocks

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def get_cached_block(self, block_hash: BlockHash) -> KVCacheBlock | None:
        return self.cached_blocks.get(block_hash)

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Take blocks from the front of the free queue, evicting the prefix they cached."""
        if num_blocks > self.num_free_blocks:
            raise ValueError(f"asked for {num_blocks} blocks, {self.num_free_blocks} free")
        blocks = [self.free_queue.popleft() for _ in range(num_blocks)]
        for b in blocks:
            self._evict(b)
            b.ref_cnt = 1
        return blocks

    def touch(self, blocks: list[KVCacheBlock]):
        """Take a reference on blocks found in the prefix cache; free ones leave the free queue."""
        for b in blocks:
            if b is NULL_BLOCK:
                continue
            if b.ref_cnt == 0:
                self.free_queue.remove(b)
            b.ref_cnt += 1

    def free_blocks(self, ordered_blocks, uncache: bool = False):
        """Drop a reference; blocks reaching 0 become free. Callers pass a request's blocks tail first, so
        the tail of a prefix is evicted before its head (heads are the more widely shared). `uncache`:
        blocks reaching 0 also lose their hash, unseen by on_evict (a failed step may not have written
        them: their KV must never be found or stored)."""
        for b in ordered_blocks:
            if b is NULL_BLOCK:
                continue
            b.ref_cnt -= 1
            assert b.ref_cnt >= 0, b
            if b.ref_cnt == 0:
                if uncache and b.block_hash is not None:
                    del self.cached_blocks[b.block_hash]
                    b.block_hash = None
                (self.free_queue.append if b.block_hash is not None else self.free_queue.appendleft)(b)

    def cache_full_blocks(self, blocks: list[KVCacheBlock], block_hashes: list[BlockHash]):
        """Name full blocks by their hashes. If another block already holds the same prefix, keep that one
        in the map; this block stays private to its request and is freed as uncached."""
        for b, h in zip(blocks, block_hashes):
            if b.block_hash is not None or b is NULL_BLOCK:
                continue
            if h not in self.cached_blocks:
                b.block_hash = h
                self.cached_blocks[h] = b

    def _evict(self, block: KVCacheBlock):
        if block.block_hash is not None:
            del self.cached_blocks[block.block_hash]
            if self.on_evict is not None:
                self.on_evict(block, block.block_hash)
            block.block_hash = None

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix; only possible when no block is in use."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for b in self.blocks:
            b.block_hash = None
        self.cached_blocks.clear()
        return True
