"""The KV tiers below the GPU, as bookkeeping: which block goes where, and when. No device code: the runner
moves the bytes (runner/kv_offload.py) in the order its docstring states.

    GPU block ──evicted──► CPU tier (kv_offloading_size, LRU) ──evicted──► disk tier (kv_disk_dir, kv_disk_gb, LRU)
        ▲                        │                                             │
        └─── load, on a hit ─────┘ ◄── read + verify, the step before ─────────┘
    preempted request ── swap ──► swap pool (swap_space) ── swap in when it resumes ──► GPU blocks
                      ── offload ─► disk tier; it resumes through the tiered prefix lookup
    a GPU block evicted while every CPU tier slot is pinned by this step goes straight to disk

The CPU slots are one id space: swap slots [0, num_swap_slots), tier slots after them. Both pools are
BlockPools: a tier slot is a cached block (hash -> slot, LRU free queue); a swap slot belongs to one request.

Invariants:
- A slot that one step's copies read or write stays pinned (ref_cnt > 0) until the step's transfers are taken,
  so no later decision of the same step reuses it; a slot being filled from disk stays pinned until the read's
  result comes back.
- A request waits at most one step for disk reads; after that its lookup stops at the CPU tier.
- The disk index never holds more than its capacity: evictions (deletes) are queued before the write they
  make room for.
- reset_prefix_cache forgets the CPU tier and the disk tier (the swap pool holds requests' own KV: kept).
"""
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from pagedllm.core.block_hash import BlockHash
from pagedllm.core.block_pool import NULL_BLOCK, BlockPool, KVCacheBlock
from pagedllm.core.messages import DiskOp, KVTransferResult, KVTransfers
from pagedllm.metrics import KVTierStats
from pagedllm.request import Request

logger = logging.getLogger("pagedllm")

_FALLBACK_LOG_INTERVAL = 60.0   # seconds between "fell back to recompute" warnings


@dataclass
class TierSizes:
    """What the runner allocated, in blocks (runner/kv_offload.py computes it from the config)."""
    block_bytes: int
    num_swap_slots: int = 0
    num_cpu_slots: int = 0
    num_disk_blocks: int = 0
    disk_hashes: list[BlockHash] = field(default_factory=list)   # found on disk at start, oldest first
    num_invalid_files: int = 0                                   # removed at start (truncated, misnamed)


@dataclass
class TierHit:
    """What a waiting request loads instead of recomputing, right after its GPU prefix hit."""
    slots: list[KVCacheBlock]     # CPU slots in block order
    num_tokens: int
    swap: bool = False            # its own swap slots (else CPU tier slots)
    wait: bool = False            # its next blocks are being read from disk: admit it next step
    missed: bool = False          # the lookup went past every lower tier before the end of the prompt


NO_HIT = TierHit([], 0)


class DiskIndex:
    """Block hashes in the disk tier, least recently used first."""

    def __init__(self, capacity: int, hashes: list[BlockHash]):
        self.capacity = capacity
        self.lru: OrderedDict[BlockHash, None] = OrderedDict.fromkeys(hashes)

    def __contains__(self, h: BlockHash) -> bool:
        return h in self.lru

    def touch(self, h: BlockHash):
        self.lru.move_to_end(h)

    def add(self, h: BlockHash) -> list[BlockHash]:
        """Insert as most recent; returns the hashes evicted to keep within capacity."""
        self.lru[h] = None
        return self.shrink()

    def shrink(self) -> list[BlockHash]:
        return [self.lru.popitem(last=False)[0] for _ in range(len(self.lru) - self.capacity)]

    def remove(self, h: BlockHash):
        self.lru.pop(h, None)


class KVOffloadManager:
    def __init__(self, block_size: int, preemption_mode: str = "recompute", store_evicted: bool = True,
                 sizes: TierSizes | None = None):
        sizes = sizes or TierSizes(0)
        self.block_size = block_size
        self.block_bytes = sizes.block_bytes
        self.preemption_mode = preemption_mode
        self.store_evicted = store_evicted and sizes.num_cpu_slots > 0   # off with prefix caching off
        self.swap_pool = BlockPool(sizes.num_swap_slots)
        self.cpu_pool = BlockPool(sizes.num_cpu_slots, on_evict=self._spill_to_disk)
        self.slot_offset = sizes.num_swap_slots     # CPU tier slot i is CPU pool slot slot_offset + i
        self.disk = DiskIndex(sizes.num_disk_blocks, sizes.disk_hashes) if sizes.num_disk_blocks else None
        tiers = {"swap": sizes.num_swap_slots > 0, "cpu": sizes.num_cpu_slots > 0, "disk": self.disk is not None}
        self.stats = {name: KVTierStats() for name, on in tiers.items() if on}
        if self.disk is not None:
            self.stats["disk"].invalid = sizes.num_invalid_files
        self.swapped: dict[str, tuple[list[KVCacheBlock], int]] = {}   # req id -> swap slots, computed tokens
        self.ops = KVTransfers()
        self._step_pins: list[KVCacheBlock] = []        # tier slots this step's copies touch
        self._step_swap_frees: list[KVCacheBlock] = []  # swap slots read by this step's swap-ins
        # Disk reads not yet reported back, by CPU pool slot id: (hash, slot, request id). With steps
        # pipelined, a step's reads are reported after the next step was scheduled.
        self._reading: dict[int, tuple[BlockHash, KVCacheBlock, str]] = {}
        self._read_req_ids: set[str] = set()            # waited once for disk reads
        self._last_fallback_log = float("-inf")
        if self.disk is not None:
            self.ops.disk_ops += [DiskOp(h) for h in self.disk.shrink()]   # kv_disk_gb was lowered

    # ---- GPU evictions and preemptions: KV leaving the GPU -------------------------------------------------
    def on_gpu_evict(self, block: KVCacheBlock, block_hash: BlockHash):
        """A cached GPU block is reused: keep its KV in the CPU tier (copied before this step's forward)."""
        if not self.store_evicted or self._store_in_cpu(block.block_id, block_hash) is not None:
            return
        if self.disk is not None and block_hash not in self.disk:
            self._write_to_disk(block_hash, gpu_block=block.block_id)

    def preempt(self, req: Request, blocks: list[KVCacheBlock]):
        """Called before the request's GPU blocks are freed; its computed tokens' KV is still in them."""
        num_computed = req.num_computed_tokens
        if self.preemption_mode == "swap" and num_computed > 0:
            if blocks and blocks[0] is NULL_BLOCK:   # its first blocks left the sliding window: not on the GPU
                self.stats["swap"].misses += 1
                self._log_fallback(f"request {req.request_id} has freed the blocks before its sliding window")
                return
            self._swap_out(req, blocks[:-(-num_computed // self.block_size)], num_computed)
        elif self.preemption_mode == "offload":   # full blocks only: the partial one is recomputed
            for block, h in zip(blocks[:num_computed // self.block_size], req.block_hashes):
                if h not in self.disk and block is not NULL_BLOCK:
                    self._write_to_disk(h, gpu_block=block.block_id)

    def _swap_out(self, req: Request, blocks: list[KVCacheBlock], num_computed: int):
        stats = self.stats["swap"]
        if len(blocks) > self.swap_pool.num_free_blocks:
            stats.misses += 1
            self._log_fallback(f"the swap space has {self.swap_pool.num_free_blocks} free blocks, "
                               f"request {req.request_id} needs {len(blocks)}")
            return
        slots = self.swap_pool.get_new_blocks(len(blocks))
        self.ops.swap_out += [(b.block_id, s.block_id) for b, s in zip(blocks, slots)]
        self.swapped[req.request_id] = (slots, num_computed)
        stats.bytes_stored += len(slots) * self.block_bytes

    def _store_in_cpu(self, gpu_block_id: int, h: BlockHash) -> KVCacheBlock | None:
        slot = self.cpu_pool.get_cached_block(h)
        if slot is not None:       # already there: only its LRU position moves
            self.cpu_pool.touch([slot])
            self.cpu_pool.free_blocks([slot])
            return slot
        if self.cpu_pool.num_free_blocks == 0:
            return None            # every slot is pinned by this step
        slot = self.cpu_pool.get_new_blocks(1)[0]
        self.cpu_pool.cache_full_blocks([slot], [h])
        self.ops.cpu_store.append((gpu_block_id, self._slot_id(slot)))
        self._step_pins.append(slot)
        self.stats["cpu"].bytes_stored += self.block_bytes
        return slot

    def _spill_to_disk(self, slot: KVCacheBlock, h: BlockHash):
        """The CPU tier evicts `slot`: its bytes go to disk (snapshot taken before this step reuses it)."""
        if self.disk is None:
            return
        if h in self.disk:
            self.disk.touch(h)
        else:
            self._write_to_disk(h, cpu_slot=self._slot_id(slot))

    def _write_to_disk(self, h: BlockHash, cpu_slot: int | None = None, gpu_block: int | None = None):
        self.ops.disk_ops += [DiskOp(old) for old in self.disk.add(h)]
        self.ops.disk_ops.append(DiskOp(h, cpu_slot, gpu_block))
        self.stats["disk"].bytes_stored += self.block_bytes

    # ---- waiting requests: lookups below the GPU ------------------------------------------------------------
    def lookup(self, req: Request, num_gpu_hit_tokens: int) -> TierHit:
        """The blocks after the GPU hit that a lower tier holds. Tier slots found are pinned: commit() or
        cancel() must follow."""
        if any(r == req.request_id for _, _, r in self._reading.values()):
            return TierHit([], 0, wait=True)   # its disk reads are not reported back yet
        if req.request_id in self.swapped:
            slots, num_computed = self.swapped[req.request_id]
            if num_gpu_hit_tokens >= num_computed:
                return TierHit([], 0, swap=True)
            return TierHit(slots[num_gpu_hit_tokens // self.block_size:], num_computed - num_gpu_hit_tokens,
                           swap=True)
        if self.cpu_pool.num_blocks == 0 or not req.sampling_params.reads_prefix_cache:
            return NO_HIT
        hashes = req.block_hashes[num_gpu_hit_tokens // self.block_size:(req.num_tokens - 1) // self.block_size]
        slots = []
        for h in hashes:
            slot = self.cpu_pool.get_cached_block(h)
            if slot is None:
                break
            slots.append(slot)
        self.cpu_pool.touch(slots)   # before disk reads take slots: they must not evict these
        missed = len(slots) < len(hashes)
        if missed and self._start_disk_reads(req, hashes[len(slots):]):
            self.cpu_pool.free_blocks(reversed(slots))
            return TierHit([], 0, wait=True)
        return TierHit(slots, len(slots) * self.block_size, missed=missed)

    def _start_disk_reads(self, req: Request, hashes: list[BlockHash]) -> bool:
        if self.disk is None or req.request_id in self._read_req_ids:
            return False
        reads = []
        for h in hashes:
            if h not in self.disk or self.cpu_pool.num_free_blocks == 0:
                break
            self.disk.touch(h)
            reads.append((h, self.cpu_pool.get_new_blocks(1)[0]))
        for h, slot in reads:
            self._reading[self._slot_id(slot)] = (h, slot, req.request_id)
        self.ops.disk_reads += [(h, self._slot_id(slot)) for h, slot in reads]
        if reads:
            self._read_req_ids.add(req.request_id)
        return bool(reads)

    def cancel(self, hit: TierHit):
        """The request was not admitted after all."""
        if not hit.swap:
            self.cpu_pool.free_blocks(reversed(hit.slots))

    def commit(self, req: Request, hit: TierHit, new_blocks: list[KVCacheBlock]):
        """The request is admitted: its first new GPU blocks receive the hit's slots before the forward."""
        pairs = [(self._slot_id(s, hit.swap), b.block_id) for s, b in zip(hit.slots, new_blocks)]
        self._read_req_ids.discard(req.request_id)
        if hit.swap:   # hit.slots are the tail of the request's slots; the GPU hit covers the others
            slots, _ = self.swapped.pop(req.request_id)
            self.swap_pool.free_blocks(slots[:len(slots) - len(hit.slots)])
            self._step_swap_frees += hit.slots
            self.ops.swap_in += pairs
            self._count_loads("swap", len(pairs))
            return
        if hit.missed:
            for name in ("cpu", "disk"):     # the lookup went past these tiers
                if name in self.stats:
                    self.stats[name].misses += 1
        if pairs:
            self.ops.cpu_load += pairs
            self._step_pins += hit.slots
            self._count_loads("cpu", len(pairs))

    def _count_loads(self, tier: str, num_blocks: int):
        self.stats[tier].hits += num_blocks
        self.stats[tier].bytes_loaded += num_blocks * self.block_bytes

    # ---- the step's transfers, and their results ----------------------------------------------------------------
    def take_ops(self) -> KVTransfers:
        """The copies decided this step; unpins what they touch (later steps are ordered after them)."""
        ops, self.ops = self.ops, KVTransfers()
        self.cpu_pool.free_blocks(reversed(self._step_pins))
        self.swap_pool.free_blocks(self._step_swap_frees)
        self._step_pins, self._step_swap_frees = [], []
        return ops

    def update_from_output(self, ops: KVTransfers, result: KVTransferResult | None):
        """`ops`: the step's transfers, as take_ops() gave them; `result`: what the runner reported."""
        result = result or KVTransferResult()
        for _, slot_id in ops.disk_reads:
            h, slot, _ = self._reading.pop(slot_id)
            reason = result.failed_reads.get(h)
            if reason is None:
                self.cpu_pool.cache_full_blocks([slot], [h])
                self._count_loads("disk", 1)
            else:
                self.disk.remove(h)
                self.stats["disk"].invalid += reason != "missing"
                logger.warning("disk tier: block %s not loaded (%s); it is recomputed", h.hex()[:16], reason)
            self.cpu_pool.free_blocks([slot])
        for tier, seconds in result.store_seconds.items():
            self.stats[tier].store_seconds += seconds
        for tier, seconds in result.load_seconds.items():
            self.stats[tier].load_seconds += seconds

    def reset_prefix_cache(self) -> bool:
        """Forget every block of the CPU tier and of the disk index; the runner deletes the block files
        (KVOffload.clear_disk). Called between steps, when the copies each step decided are taken. False,
        changing nothing, while a CPU tier slot is pinned: by a disk read not reported back yet (its result
        would name the slot again), or by this step's copies. The swap pool is kept: it holds preempted
        requests' own KV, which they resume from."""
        if self._reading or not self.cpu_pool.reset_prefix_cache():
            return False
        if self.disk is not None:
            self.disk.lru.clear()
        return True

    # ---- requests ending, stats ---------------------------------------------------------------------------
    def free(self, req: Request):
        slots, _ = self.swapped.pop(req.request_id, ([], 0))
        self.swap_pool.free_blocks(slots)
        self._read_req_ids.discard(req.request_id)

    def make_stats(self) -> dict[str, KVTierStats]:
        return {name: KVTierStats(**vars(s)) for name, s in self.stats.items()}

    def _slot_id(self, slot: KVCacheBlock, swap: bool = False) -> int:
        return slot.block_id if swap else self.slot_offset + slot.block_id

    def _log_fallback(self, why: str):
        now = time.monotonic()
        if now - self._last_fallback_log >= _FALLBACK_LOG_INTERVAL:
            self._last_fallback_log = now
            logger.warning("preemption falls back to recompute: %s (logged at most once a minute)", why)
