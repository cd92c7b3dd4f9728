"""Copy-on-write forks of a finished request's KV (beam search; the PagedAttention paper's §4.4).

A request added with hold_kv keeps its blocks when it finishes (a hold) instead of freeing them. A request
added with kv_parent extends a held request's tokens: when admitted it takes the parent's full blocks by
reference and its last, partial block either by taking it over (the parent's last claimant, once the
driver has released the parent: no copy) or as a device copy of that one block (the others); then it
computes only its own new tokens. Nothing of the parent is recomputed.

    parent (held):  [ full | full | partial ]       children:  c1 [ full | full | copy of partial ]
                                                               c2 [ full | full | partial (taken over) ]

A hold ends, its references dropped once, when the driver has released it and no waiting child claims it.
Forks are best effort: a child whose hold is gone (dropped to make room, oldest first, or never there) or does not match
its tokens is admitted as any request (prefix-cache hits on the full blocks, the rest recomputed); so is a
forked child that is preempted later (its claim was spent at the first admission).
"""
from dataclasses import dataclass

from pagedllm.core.block_pool import KVCacheBlock, cdiv
from pagedllm.request import Request, RequestStatus

_HOLDABLE = (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH)


@dataclass
class KVHold:
    request: Request                 # the finished parent: its tokens, cache salt and adapter
    blocks: list[KVCacheBlock]       # cdiv(num_tokens, block_size) blocks; the last may be partial
    num_tokens: int                  # tokens whose KV the blocks hold
    num_claims: int = 0              # waiting children that may still fork it
    released: bool = False           # its driver adds no more children


@dataclass
class ForkStats:
    num_forks: int = 0               # children admitted on a parent's KV
    num_block_copies: int = 0        # partial blocks copied (the other forks took theirs over)
    num_dropped_holds: int = 0       # holds ended early to make room


class KVForks:
    """The holds of one KVCacheManager, and the block copies the forks of a step need."""

    def __init__(self, kv):
        self.kv = kv                 # KVCacheManager: its pool, and its per-request block lists
        self.holds: dict[str, KVHold] = {}
        self.block_copies: list[tuple[int, int]] = []   # (src block, dst block), taken by each schedule()
        self.stats = ForkStats()

    # ---- parents ---------------------------------------------------------------------------------------------
    def can_hold(self, request: Request) -> bool:
        return request.hold_kv and request.status in _HOLDABLE and request.num_computed_tokens > 0

    def hold(self, request: Request):
        """In place of KVCacheManager.free for a request that ended normally: keep the blocks of its computed
        tokens (a token sampled last has no KV yet)."""
        kv, rid = self.kv, request.request_id
        if rid in self.holds:                             # an id used again: the older hold ends
            self._end(rid, self.holds[rid])
        blocks = kv.take_blocks(rid)
        num_tokens = min(request.num_computed_tokens, request.num_tokens - 1)
        keep = cdiv(num_tokens, kv.block_size)
        kv.pool.free_blocks(reversed(blocks[keep:]))
        self.holds[rid] = KVHold(request, blocks[:keep], num_tokens)
        self._set_empty_slots(rid, keep * kv.block_size - num_tokens)   # counted until the hold ends

    def release(self, parent_ids):
        """The driver adds no more children of these parents: each hold ends once its claims are spent.
        Unknown ids (not held, or already dropped) are ignored."""
        for rid in parent_ids:
            hold = self.holds.get(rid)
            if hold is not None:
                hold.released = True
                self._end_if_done(rid, hold)

    def drop_oldest(self) -> bool:
        """End the oldest hold now (the pool is short of blocks); its waiting children recompute. False if none."""
        if not self.holds:
            return False
        rid = next(iter(self.holds))
        self._end(rid, self.holds[rid])
        self.stats.num_dropped_holds += 1
        return True

    # ---- children --------------------------------------------------------------------------------------------
    def claim(self, request: Request):
        """A new request names its parent: counted while it waits; kv_parent is cleared if nothing is held."""
        hold = self.holds.get(request.kv_parent)
        if hold is None or hold.released:
            request.kv_parent = None
        else:
            hold.num_claims += 1

    def unclaim(self, request: Request):
        """The request no longer needs its parent (it ended while waiting, or is admitted without it)."""
        rid, request.kv_parent = request.kv_parent, None
        hold = self.holds.get(rid)
        if hold is not None:
            hold.num_claims -= 1
            self._end_if_done(rid, hold)

    def usable_hold(self, request: Request) -> KVHold | None:
        """The hold this waiting request can fork, or None (its claim, if any, is then given up)."""
        if request.kv_parent is None:
            return None
        hold = self.holds.get(request.kv_parent)
        if hold is not None and _extends(request, hold):
            return hold
        self.unclaim(request)
        return None

    def fork(self, request: Request, hold: KVHold, num_new_tokens: int) -> list[KVCacheBlock] | None:
        """Admit `request` on its parent's blocks plus room for num_new_tokens; its new blocks, or None when
        the free blocks cannot cover them (the claim stays). The copy of the partial block, if any, is queued
        for this step: the runner does it before the forward that writes the child's own token into it."""
        kv, bs = self.kv, self.kv.block_size
        num_full = hold.num_tokens // bs
        partial = hold.blocks[num_full:]                  # 0 or 1 block
        take = bool(partial) and hold.released and hold.num_claims == 1
        num_total = hold.num_tokens + num_new_tokens
        num_new_blocks = cdiv(num_total, bs) - num_full - take
        if num_new_blocks > kv.pool.num_free_blocks:
            return None
        shared = hold.blocks[:num_full]
        kv.pool.touch(shared)
        new_blocks = kv.pool.get_new_blocks(num_new_blocks)
        if take:
            hold.blocks.pop()                             # its reference moves to the child
        elif partial:
            self.block_copies.append((partial[0].block_id, new_blocks[0].block_id))
            self.stats.num_block_copies += 1
        blocks = shared + (partial if take else []) + new_blocks
        rid = request.request_id
        kv.req_to_blocks[rid] = blocks
        kv.num_cached_blocks[rid] = min(num_full, len(request.block_hashes))
        kv._cache_full_blocks(request, blocks, num_total)
        self._set_empty_slots(rid, len(blocks) * bs - num_total)
        self.stats.num_forks += 1
        self.unclaim(request)
        return new_blocks

    def take_copies(self) -> list[tuple[int, int]]:
        copies, self.block_copies = self.block_copies, []
        return copies

    # ---- helpers ---------------------------------------------------------------------------------------------
    def _end_if_done(self, rid: str, hold: KVHold):
        if hold.released and hold.num_claims <= 0:
            self._end(rid, hold)

    def _end(self, rid: str, hold: KVHold):
        del self.holds[rid]
        self.kv.pool.free_blocks(reversed(hold.blocks))
        self._set_empty_slots(rid, 0)
        self.kv.req_to_empty_slots.pop(rid, None)

    def _set_empty_slots(self, rid: str, num_empty: int):
        kv = self.kv
        kv.num_empty_slots += num_empty - kv.req_to_empty_slots.get(rid, 0)
        kv.req_to_empty_slots[rid] = num_empty


def _extends(child: Request, hold: KVHold) -> bool:
    """The child's tokens start with the parent's held ones (and hash alike: same salt and adapter)."""
    parent, n = hold.request, hold.num_tokens
    return (child.num_tokens > n and child.cache_salt == parent.cache_salt and child.lora_key == parent.lora_key
            and child.sampling_params.reads_prefix_cache and child.all_token_ids[:n] == parent.all_token_ids[:n])
