"""Block-level access to the paged KV cache, and the copies between it, the CPU pool and the disk tier.

GPU layout, per layer: (2, num_blocks, block_size, num_kv_heads, head_dim). CPU pool (pinned on CUDA):
(num_slots, num_layers, 2, block_size, num_kv_heads, head_dim): one slot holds one block of every layer,
contiguous, exactly the payload of a disk block file. Slots [0, num_swap_slots) are the swap pool, the
rest the CPU tier of the prefix cache (core/offload.py keeps their bookkeeping). Pool and copies take the
cache's dtype (an fp8 cache's blocks move as bytes: uint8 views, CPU torch has no index_copy_ for float8).

One step's KVTransfers, in this order, so that every read sees the bytes the scheduler meant:
  1. if the host touches slots (2, 4): wait for the copy stream's earlier copies into and out of them
  2. disk ops, queued to the writer thread in list order: a write from a CPU slot snapshots it now (3 may
     reuse the slot); a write from a GPU block gets its bytes in 3; a delete is just queued
  3. gather the GPU blocks leaving (swap out, CPU tier stores, disk writes) before this step's forward
     overwrites them; the forward waits for the gather only: the device -> host copies overlap it (all of
     them when the step moves at most COPY_CHUNK_BLOCKS blocks; else those of the last chunk, see below)
  4. disk reads into their slots, verified (a later step loads them; a read of a block written in 3
     waits for that write); forks' block copies (copy_blocks) on the compute stream: after the blocks
     leaving are read (a fork's new block may be one swapped out this step), before 5 writes any block
     (a fork's source freed later in the same schedule may be a block loaded into this step)
  5. copy loaded slots (swap in, CPU tier hits) into their new GPU blocks; the forward waits for them
On CUDA, 3 and 5 run on a copy stream of their own, after the work already queued on the compute stream.
3 and 5 go through a GPU scratch buffer of at most COPY_CHUNK_BLOCKS blocks, chunk after chunk on the copy
stream, so the memory they take outside the profiled step is bounded (the memory profile reserves it).

Tensor parallelism: every rank has a KVOffload of its own (its pool, its copy stream, its disk directory) and
runs the same KVTransfers, which rank 0's scheduler decided, in the same step (they travel in the step's
SchedulerOutput): each rank moves its own KV heads' share of the same block ids and slots. The slot counts are
equal on every rank (the same bytes a block). Sizes, as vLLM's: swap_space is a rank's (vLLM V0's, per GPU);
kv_offloading_size and kv_disk_gb are the whole tier's, over every rank (vLLM 0.26's kv_offloading_size is the
sum over the ranks). The block bytes the tier stats count (TierSizes.block_bytes) are the whole block's, every
rank's share summed, as vLLM sums its workers' transfer bytes; transfer seconds are rank 0's (the ranks copy at
once). A disk block is one file a rank: only a block every rank holds is in the tier (start-up keeps the
hashes found on every rank, and removes the others), and a read that fails on any rank fails on all.
"""
import time
from contextlib import contextmanager

import numpy as np
import torch

from pagedllm.attention.kv_quant import raw
from pagedllm.config import EngineConfig
from pagedllm.core.messages import DiskOp, KVTransferResult, KVTransfers
from pagedllm.core.offload import TierSizes
from pagedllm.distributed.parallel_state import TPGroup
from pagedllm.runner.kv_disk import DiskStore, PendingPayload, model_identity
from pagedllm.sample.host_copy import to_device

# Blocks per copy between the GPU KV cache and the CPU pool: the size of the copies' GPU scratch buffer, however
# many blocks a step moves. At block_size 16 in bf16 a block is 2 MiB for Llama-3-8B (32 layers, 8 KV heads of
# 128) and 5 MiB for Llama-3-70B (80 layers): 128 and 320 MiB, under 0.3% of an H200. Each chunk costs the host
# 1-2 launches a layer: a returning 30k-token conversation (1,878 blocks loaded in one step) came back in 0.229 s
# at 46.3 GB/s with 64-block chunks, 0.294 s at 42.1 GB/s with 16 (H200, benchmarks/returning_conversation.py).
COPY_CHUNK_BLOCKS = 64


def copy_scratch_bytes(block_bytes: int, num_layers: int) -> int:
    """The most GPU memory the tier copies hold at once: one chunk, and the one layer of it that
    get_kv_from_block selects before placing it."""
    return -(-COPY_CHUNK_BLOCKS * block_bytes * (num_layers + 1) // num_layers)


def get_kv_from_block(kv_caches: list[torch.Tensor], block_ids, out: torch.Tensor | None = None) -> torch.Tensor:
    """K and V of every layer for the given blocks, on the cache's device: (n, num_layers, 2, block_size,
    num_kv_heads, head_dim) for a list or tensor of n ids, (num_layers, 2, ...) for one id. `out`: a buffer of
    that shape to fill (a chunk of the copies' scratch), else a new one."""
    idx = _as_index(block_ids, kv_caches[0].device)
    two, _, *block_shape = kv_caches[0].shape
    if out is None:
        out = torch.empty((idx.numel(), len(kv_caches), two, *block_shape), dtype=kv_caches[0].dtype,
                          device=kv_caches[0].device)
    for layer, kv in enumerate(kv_caches):
        raw(out[:, layer]).copy_(raw(kv).index_select(1, idx).transpose(0, 1))
    return out[0] if isinstance(block_ids, int) else out


def put_kv_into_block(kv_caches: list[torch.Tensor], block_ids, kv: torch.Tensor):
    """The inverse of get_kv_from_block: kv (n, num_layers, 2, ...) on the cache's device into the blocks."""
    idx = _as_index(block_ids, kv_caches[0].device)
    kv = kv.unsqueeze(0) if isinstance(block_ids, int) else kv
    for layer, cache in enumerate(kv_caches):
        raw(cache).index_copy_(1, idx, raw(kv[:, layer]).transpose(0, 1))


def copy_blocks(kv_caches: list[torch.Tensor], pairs: list[tuple[int, int]]):
    """Copy-on-write forks (core/kv_fork.py): each (src, dst) block's K and V, every layer, as raw bytes (fp8
    too). Queued on the compute stream between the tier copies' reads and writes (KVOffload.execute) and
    before the forward, which then writes the forked request's own tokens into dst."""
    device = kv_caches[0].device
    src, dst = _as_index([s for s, _ in pairs], device), _as_index([d for _, d in pairs], device)
    for kv in kv_caches:
        raw(kv).index_copy_(1, dst, raw(kv).index_select(1, src))


def _as_index(block_ids, device) -> torch.Tensor:
    if isinstance(block_ids, torch.Tensor):
        return block_ids.to(device=device, dtype=torch.int64)
    ids = [block_ids] if isinstance(block_ids, int) else list(block_ids)
    return to_device(ids, torch.int64, device)   # from pinned memory: a pageable copy waits for the stream


class KVOffload:
    """The CPU pool, the disk store, and the copies of one step between them and the GPU KV cache."""

    def __init__(self, config: EngineConfig, hf_config, kv_caches: list[torch.Tensor], block_bytes: int,
                 model_dtype: torch.dtype | None = None, tp: TPGroup = TPGroup()):
        """block_bytes: a block of this rank's KV cache (its KV heads); tp: this rank's group (see the module
        doc)."""
        self.kv_caches, self.tp = kv_caches, tp
        device = kv_caches[0].device
        num_swap = _num_blocks(config.swap_space, block_bytes, "swap_space") \
            if config.preemption_mode == "swap" else 0
        num_cpu = _num_blocks(config.kv_offloading_size or 0, block_bytes * tp.size, "kv_offloading_size")
        two, _, *block_shape = kv_caches[0].shape
        self.pool = torch.empty((num_swap + num_cpu, len(kv_caches), two, *block_shape), dtype=kv_caches[0].dtype,
                                pin_memory=device.type == "cuda")
        self.sizes = TierSizes(block_bytes * tp.size, num_swap, num_cpu)
        self.disk = None
        if config.kv_disk_dir is not None:
            identity = model_identity(config.model, hf_config, kv_caches[0].dtype, config.block_size,
                                      config.load_format, device.type, config.quantization, model_dtype,
                                      config.hf_overrides, tp.rank, tp.size)
            self.disk = DiskStore(config.kv_disk_dir, identity, block_bytes)
            self.sizes.num_disk_blocks = _num_blocks(config.kv_disk_gb, self.disk.file_bytes * tp.size,
                                                     "kv_disk_gb")
            self.sizes.disk_hashes, self.sizes.num_invalid_files = self._scan_disk()
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._timings: list = []   # (tier, "store" | "load", start event, end event) not yet read back

    def execute(self, t: KVTransfers) -> KVTransferResult:
        result = KVTransferResult()
        if self.stream is not None and (t.disk_ops or t.disk_reads):
            self.stream.synchronize()
        to_disk: list[tuple[int, PendingPayload]] = []
        try:
            self._queue_disk_ops(t.disk_ops, to_disk)
            if t.swap_out or t.cpu_store or to_disk:
                self._store(t, to_disk)
        finally:   # a copy that raised (no pinned memory left): the writer thread must not wait for its bytes
            for _, payload in to_disk:
                payload.abandon()
        if t.disk_reads:
            start = time.perf_counter()
            failed = self.disk.read_many([(h, self._slot_bytes(s)) for h, s in t.disk_reads])
            result.failed_reads = self._failed_on_any_rank(failed)
            result.load_seconds["disk"] = time.perf_counter() - start
        if t.block_copies:
            copy_blocks(self.kv_caches, t.block_copies)
        if t.swap_in or t.cpu_load:
            self._load(t)
        if self.disk is not None:
            result.store_seconds["disk"] = self.disk.take_write_seconds()
        self._read_timings(result)
        return result

    def _scan_disk(self) -> tuple[list[bytes], int]:
        """The block hashes every rank's directory holds (rank 0's LRU order) and the files removed at start. A
        block on some ranks only (a rank stopped before its write was done) is no block: its files go."""
        hashes, num_removed = self.disk.scan()
        if not self.tp.enabled:
            return hashes, num_removed
        found = self.tp.gather_objects((hashes, num_removed))
        common = set(hashes).intersection(*(h for h, _ in found))
        for h in hashes:
            if h not in common:
                self.disk.delete(h)
        return [h for h in found[0][0] if h in common], sum(n for _, n in found)

    def _failed_on_any_rank(self, failed: dict[bytes, str]) -> dict[bytes, str]:
        """Disk reads that failed on some rank fail on all (the scheduler forgets the block): a rank that read
        its share deletes its file, which would otherwise stay on disk outside the tier's index."""
        if not self.tp.enabled:
            return failed
        merged: dict[bytes, str] = {}
        for rank_failed in self.tp.gather_objects(failed):
            for h, reason in rank_failed.items():
                if merged.get(h, "missing") == "missing":   # a bad file's reason counts it invalid: kept
                    merged[h] = reason
        for h in merged.keys() - failed.keys():
            self.disk.delete(h)
        return merged

    def clear_disk(self):
        """reset_prefix_cache: delete this model's block files, after the disk ops already queued, so that a
        restarted engine does not find them."""
        if self.disk is not None:
            self.disk.clear()

    def flush(self):
        """Wait for the queued disk writes (tests; a restart of the process keeps what is flushed)."""
        if self.disk is not None:
            self.disk.flush()

    def _queue_disk_ops(self, ops: list[DiskOp], to_disk: list[tuple[int, PendingPayload]]):
        """Phase 2; appends to to_disk the writes whose bytes come from GPU blocks, for phase 3."""
        for op in ops:
            if op.cpu_slot is not None:
                self.disk.write(op.block_hash, self._slot_bytes(op.cpu_slot).copy())
            elif op.gpu_block is not None:
                to_disk.append((op.gpu_block, PendingPayload()))
                self.disk.write(op.block_hash, to_disk[-1][1])
            else:
                self.disk.delete(op.block_hash)

    def _slot_bytes(self, slot: int) -> np.ndarray:
        return self.pool[slot].view(-1).view(torch.uint8).numpy()

    # ---- GPU <-> CPU ----------------------------------------------------------------------------------------
    def _store(self, t: KVTransfers, to_disk: list[tuple[int, PendingPayload]]):
        # (tier, chunk of (GPU block, destination)): a pool slot, or a row of `host` for the disk writes.
        # Sorted by slot: consecutive slots make one copy each (a prefix is evicted tail first).
        chunks = [(tier, c) for tier, pairs in (("swap", t.swap_out), ("cpu", t.cpu_store)) if pairs
                  for c in _chunks(sorted(pairs, key=lambda p: p[1]))]
        chunks += [("disk", c) for c in _chunks([(b, i) for i, (b, _) in enumerate(to_disk)])]
        if to_disk:
            host = torch.empty((len(to_disk), self.pool[0].numel()), dtype=self.pool.dtype,
                               pin_memory=self.stream is not None)
        with self._on_copy_stream() as forward_waits_for:
            scratch = self._scratch(max(len(c) for _, c in chunks))
            for k, (tier, chunk) in enumerate(chunks):
                kv = get_kv_from_block(self.kv_caches, [b for b, _ in chunk], scratch[:len(chunk)])
                if k == len(chunks) - 1:   # every block leaving is read: the forward may overwrite them
                    forward_waits_for.append(self._record())
                if tier == "disk":
                    first = chunk[0][1]
                    host[first:first + len(chunk)].copy_(kv.view(len(chunk), -1), non_blocking=True)
                    continue
                with self._timed(tier, "store"):
                    for i, slot, n in _runs([s for _, s in chunk]):
                        self.pool[slot:slot + n].copy_(kv[i:i + n], non_blocking=True)
            if to_disk:
                copied = self._record()
                for i, (_, payload) in enumerate(to_disk):
                    payload.fill(host[i].view(torch.uint8).numpy(), copied)

    def _load(self, t: KVTransfers):
        with self._on_copy_stream() as forward_waits_for:
            staging = self._scratch(max(len(t.swap_in), len(t.cpu_load)))
            for tier, pairs in (("swap", t.swap_in), ("cpu", t.cpu_load)):
                if pairs:
                    with self._timed(tier, "load"):
                        self._load_pairs(pairs, staging)
            forward_waits_for.append(self._record())

    def _load_pairs(self, pairs: list[tuple[int, int]], staging: torch.Tensor):
        for chunk in _chunks(sorted(pairs)):   # by slot: consecutive slots make one copy each
            kv = staging[:len(chunk)]
            for i, slot, n in _runs([s for s, _ in chunk]):
                kv[i:i + n].copy_(self.pool[slot:slot + n], non_blocking=True)
            put_kv_into_block(self.kv_caches, [b for _, b in chunk], kv)

    def _scratch(self, num_blocks: int) -> torch.Tensor:
        """The GPU buffer that the chunks of one call's copies pass through in turn. Allocated on the copy
        stream: the caching allocator hands it out again only to work queued after these copies."""
        cache = self.kv_caches[0]
        return torch.empty((min(num_blocks, COPY_CHUNK_BLOCKS), *self.pool.shape[1:]), dtype=cache.dtype,
                           device=cache.device)

    @contextmanager
    def _on_copy_stream(self):
        """On CUDA: the block runs on the copy stream after the work queued on the compute stream, which
        then waits for the events the block lists (and for nothing else)."""
        if self.stream is None:
            yield []
            return
        main = torch.cuda.current_stream(self.stream.device)
        self.stream.wait_stream(main)
        waits = []
        with torch.cuda.stream(self.stream):
            yield waits
        for event in waits:
            main.wait_event(event)

    # ---- timing: CUDA events on the copy stream, read back once they have completed ---------------------------
    def _record(self):
        if self.stream is None:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record(self.stream)
        return event

    @contextmanager
    def _timed(self, tier: str, kind: str):
        if self.stream is None:
            start = time.perf_counter()
            yield
            self._timings.append((tier, kind, time.perf_counter() - start, None))
            return
        start = self._record()
        yield
        self._timings.append((tier, kind, start, self._record()))

    def _read_timings(self, result: KVTransferResult):
        pending = []
        for tier, kind, start, end in self._timings:
            if end is None:
                seconds = start
            elif end.query():
                seconds = start.elapsed_time(end) / 1e3
            else:
                pending.append((tier, kind, start, end))
                continue
            into = result.store_seconds if kind == "store" else result.load_seconds
            into[tier] = into.get(tier, 0.0) + seconds
        self._timings = pending


def _chunks(pairs: list) -> list[list]:
    return [pairs[i:i + COPY_CHUNK_BLOCKS] for i in range(0, len(pairs), COPY_CHUNK_BLOCKS)]


def _runs(slots: list[int]) -> list[tuple[int, int, int]]:
    """(index into slots, first slot, length) of each run of consecutive slots: one copy per run."""
    runs = []
    for i, slot in enumerate(slots):
        if runs and slot == runs[-1][1] + runs[-1][2]:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((i, slot, 1))
    return runs


def _num_blocks(gib: float, block_bytes: int, name: str) -> int:
    num = int(gib * 2**30) // block_bytes
    if gib > 0 and num < 1:
        raise ValueError(f"{name}={gib} GiB holds no KV block ({block_bytes} bytes a block): raise {name}")
    return num
