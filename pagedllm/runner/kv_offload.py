"""Block-level access to the paged KV cache, and the copies between it, the CPU pool and the disk tier.

GPU layout, per layer: (2, num_blocks, block_size, num_kv_heads, head_dim). CPU pool (pinned on CUDA):
(num_slots, num_layers, 2, block_size, num_kv_heads, head_dim): one slot holds one block of every layer,
contiguous, exactly the payload of a disk block file. Slots [0, num_swap_slots) are the swap pool, the
rest the CPU tier of the prefix cache (core/offload.py keeps their bookkeeping).

One step's KVTransfers, in this order, so that every read sees the bytes the scheduler meant:
  1. if the host touches slots (2, 4): wait for the copy stream's earlier copies into and out of them
  2. disk ops, queued to the writer thread in list order: a write from a CPU slot snapshots it now (3 may
     reuse the slot); a write from a GPU block gets its bytes in 3; a delete is just queued
  3. gather the GPU blocks leaving (swap out, CPU tier stores, disk writes) before this step's forward
     overwrites them; the forward waits for the gather only: the device -> host copies overlap it (all of
     them when the step moves at most COPY_CHUNK_BLOCKS blocks; else those of the last chunk, see below)
  4. disk reads into their slots, verified (a later step loads them; a read of a block written in 3
     waits for that write)
  5. copy loaded slots (swap in, CPU tier hits) into their new GPU blocks; the forward waits for them
On CUDA, 3 runs on a store stream and 5 on a load stream, after the work already queued on the compute stream
and on each other (earlier steps). Each goes through a GPU scratch buffer of at most COPY_CHUNK_BLOCKS blocks,
chunk after chunk, so the memory they take outside the profiled step is bounded (the memory profile reserves
both). Within a step, 5 waits only for what it must: a loaded chunk's GPU blocks for the gather of the stores
that read them (the blocks a step loads into are usually the ones it evicts), its slots for the host copy of the
stores that wrote them. The stores are ordered as the loads will overwrite their blocks, so device -> host and
host -> device copies run at once (PCIe is full duplex): a returning conversation evicts about as much as it
loads. OVERLAP_LOADS = False puts 5 on the store stream, after 3 (A/B: benchmarks/returning_conversation.py).
"""
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from pagedllm.config import EngineConfig
from pagedllm.core.messages import DiskOp, KVTransferResult, KVTransfers
from pagedllm.core.offload import TierSizes
from pagedllm.runner.kv_disk import DiskStore, PendingPayload, model_identity
from pagedllm.sample.host_copy import to_device

# Blocks per copy between the GPU KV cache and the CPU pool: the size of the copies' GPU scratch buffer, however
# many blocks a step moves. At block_size 16 in bf16 a block is 2 MiB for Llama-3-8B (32 layers, 8 KV heads of
# 128) and 5 MiB for Llama-3-70B (80 layers): 128 and 320 MiB, under 0.3% of an H200. Each chunk costs the host
# 1-2 launches a layer (the gather or scatter of each layer's K/V), ~0.5 ms of Python at 32 layers, about what
# 16 blocks' 32 MiB take over PCIe, and each chunk's block indices came from pageable memory, whose copy waits
# for the stream (now pinned): W3's CPU-tier loads ran at 48.6 GB/s with one copy a step and 39.9 with 16-block
# chunks (H200). 64 blocks make the copies the longer part. A returning 30k-token conversation loads ~1,900
# blocks in one step (benchmarks/returning_conversation.py).
COPY_CHUNK_BLOCKS = 64
OVERLAP_LOADS = True   # loads on their own stream, overlapping the same step's stores (see the docstring)


def copy_scratch_bytes(block_bytes: int, num_layers: int) -> int:
    """The most GPU memory the tier copies hold at once: one chunk for the stores and one for the loads, and
    the one layer of a chunk that get_kv_from_block selects before placing it."""
    return -(-COPY_CHUNK_BLOCKS * block_bytes * (2 * num_layers + 1) // num_layers)


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
        out[:, layer].copy_(kv.index_select(1, idx).transpose(0, 1))
    return out[0] if isinstance(block_ids, int) else out


def put_kv_into_block(kv_caches: list[torch.Tensor], block_ids, kv: torch.Tensor):
    """The inverse of get_kv_from_block: kv (n, num_layers, 2, ...) on the cache's device into the blocks."""
    idx = _as_index(block_ids, kv_caches[0].device)
    kv = kv.unsqueeze(0) if isinstance(block_ids, int) else kv
    for layer, cache in enumerate(kv_caches):
        cache.index_copy_(1, idx, kv[:, layer].transpose(0, 1))


def _as_index(block_ids, device) -> torch.Tensor:
    if isinstance(block_ids, torch.Tensor):
        return block_ids.to(device=device, dtype=torch.int64)
    ids = [block_ids] if isinstance(block_ids, int) else list(block_ids)
    return to_device(ids, torch.int64, device)   # from pinned memory: a pageable copy waits for the stream


class KVOffload:
    """The CPU pool, the disk store, and the copies of one step between them and the GPU KV cache."""

    def __init__(self, config: EngineConfig, hf_config, kv_caches: list[torch.Tensor], block_bytes: int):
        self.kv_caches = kv_caches
        device = kv_caches[0].device
        num_swap = _num_blocks(config.swap_space, block_bytes, "swap_space") \
            if config.preemption_mode == "swap" else 0
        num_cpu = _num_blocks(config.cpu_offload_gb, block_bytes, "cpu_offload_gb")
        two, _, *block_shape = kv_caches[0].shape
        self.pool = torch.empty((num_swap + num_cpu, len(kv_caches), two, *block_shape), dtype=kv_caches[0].dtype,
                                pin_memory=device.type == "cuda")
        self.sizes = TierSizes(block_bytes, num_swap, num_cpu)
        self.disk = None
        if config.kv_disk_dir is not None:
            identity = model_identity(config.model, hf_config, kv_caches[0].dtype, config.block_size,
                                      config.load_format, device.type)
            self.disk = DiskStore(config.kv_disk_dir, identity, block_bytes)
            self.sizes.num_disk_blocks = _num_blocks(config.kv_disk_gb, self.disk.file_bytes, "kv_disk_gb")
            self.sizes.disk_hashes, self.sizes.num_invalid_files = self.disk.scan()
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None        # stores, disk
        self.load_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._timings: list = []   # (tier, "store" | "load", start event, end event) not yet read back

    def execute(self, t: KVTransfers) -> KVTransferResult:
        result = KVTransferResult()
        if self.stream is not None:
            if t.disk_ops or t.disk_reads:
                self.stream.synchronize()
                self.load_stream.synchronize()
            # Earlier steps' copies first: a slot a load read may be stored into now, a stored slot loaded.
            self.stream.wait_stream(self.load_stream)
            self.load_stream.wait_stream(self.stream)
        to_disk = self._queue_disk_ops(t.disk_ops)
        loads = [("swap", sorted(t.swap_in)), ("cpu", sorted(t.cpu_load))]   # by slot: one copy per run
        stores = StoreEvents()
        if t.swap_out or t.cpu_store or to_disk:
            rank = {b: i for i, (_, b) in enumerate(p for _, pairs in loads for p in pairs)}
            stores = self._store(t, to_disk, rank)
        if t.disk_reads:
            start = time.perf_counter()
            result.failed_reads = self.disk.read_many([(h, self._slot_bytes(s)) for h, s in t.disk_reads])
            result.load_seconds["disk"] = time.perf_counter() - start
        if t.swap_in or t.cpu_load:
            self._load(loads, stores)
        if self.disk is not None:
            result.store_seconds["disk"] = self.disk.take_write_seconds()
        self._read_timings(result)
        return result

    def clear_disk(self):
        """reset_prefix_cache: delete this model's block files, after the disk ops already queued, so that a
        restarted engine does not find them."""
        if self.disk is not None:
            self.disk.clear()

    def flush(self):
        """Wait for the queued disk writes (tests; a restart of the process keeps what is flushed)."""
        if self.disk is not None:
            self.disk.flush()

    def _queue_disk_ops(self, ops: list[DiskOp]) -> list[tuple[int, PendingPayload]]:
        """Phase 2; returns the writes whose bytes come from GPU blocks, for phase 3."""
        to_disk = []
        for op in ops:
            if op.cpu_slot is not None:
                self.disk.write(op.block_hash, self._slot_bytes(op.cpu_slot).copy())
            elif op.gpu_block is not None:
                to_disk.append((op.gpu_block, PendingPayload()))
                self.disk.write(op.block_hash, to_disk[-1][1])
            else:
                self.disk.delete(op.block_hash)
        return to_disk

    def _slot_bytes(self, slot: int) -> np.ndarray:
        return self.pool[slot].view(-1).view(torch.uint8).numpy()

    # ---- GPU <-> CPU ----------------------------------------------------------------------------------------
    def _store(self, t: KVTransfers, to_disk: list[tuple[int, PendingPayload]], rank: dict[int, int]) -> "StoreEvents":
        # (tier, chunk of (GPU block, destination)): a pool slot, or a row of `host` for the disk writes. In the
        # order this step's loads overwrite the blocks (rank), then by slot: consecutive slots make one copy.
        def order(pairs):
            return sorted(pairs, key=lambda p: (rank.get(p[0], len(rank)), p[1]))
        chunks = [(tier, c) for tier, pairs in (("swap", t.swap_out), ("cpu", t.cpu_store)) if pairs
                  for c in _chunks(order(pairs))]
        chunks += [("disk", c) for c in _chunks([(b, i) for i, (b, _) in enumerate(to_disk)])]
        if to_disk:
            host = torch.empty((len(to_disk), self.pool[0].numel()), dtype=self.pool.dtype,
                               pin_memory=self.stream is not None)
        done = StoreEvents()
        with self._on_copy_stream(self.stream) as forward_waits_for:
            scratch = self._scratch(max(len(c) for _, c in chunks))
            for k, (tier, chunk) in enumerate(chunks):
                kv = get_kv_from_block(self.kv_caches, [b for b, _ in chunk], scratch[:len(chunk)])
                done.gathered.append(self._record(self.stream))
                done.block_chunk.update((b, k) for b, _ in chunk)
                if tier == "disk":
                    first = chunk[0][1]
                    host[first:first + len(chunk)].copy_(kv.view(len(chunk), -1), non_blocking=True)
                else:
                    with self._timed(tier, "store", self.stream):
                        for i, slot, n in _runs([s for _, s in chunk]):
                            self.pool[slot:slot + n].copy_(kv[i:i + n], non_blocking=True)
                    done.slot_chunk.update((s, k) for _, s in chunk)
                done.copied.append(self._record(self.stream))
            forward_waits_for.append(done.gathered[-1])   # every block leaving is read: the forward may overwrite
            if to_disk:
                for i, (_, payload) in enumerate(to_disk):
                    payload.fill(host[i].view(torch.uint8).numpy(), done.copied[-1])
        return done

    def _load(self, loads: list[tuple[str, list[tuple[int, int]]]], stores: "StoreEvents"):
        stream = self.load_stream if OVERLAP_LOADS else self.stream
        with self._on_copy_stream(stream) as forward_waits_for:
            staging = self._scratch(max(len(pairs) for _, pairs in loads))
            for tier, pairs in loads:
                if pairs:
                    with self._timed(tier, "load", stream):
                        for chunk in _chunks(pairs):
                            stores.wait(stream, chunk)
                            kv = staging[:len(chunk)]
                            for i, slot, n in _runs([s for s, _ in chunk]):
                                kv[i:i + n].copy_(self.pool[slot:slot + n], non_blocking=True)
                            put_kv_into_block(self.kv_caches, [b for _, b in chunk], kv)
            forward_waits_for.append(self._record(stream))

    def _scratch(self, num_blocks: int) -> torch.Tensor:
        """The GPU buffer that the chunks of one call's copies pass through in turn. Allocated on the copy
        stream: the caching allocator hands it out again only to work queued after these copies."""
        cache = self.kv_caches[0]
        return torch.empty((min(num_blocks, COPY_CHUNK_BLOCKS), *self.pool.shape[1:]), dtype=cache.dtype,
                           device=cache.device)

    @contextmanager
    def _on_copy_stream(self, stream):
        """On CUDA: the block runs on `stream` after the work queued on the compute stream, which then waits
        for the events the block lists (and for nothing else)."""
        if stream is None:
            yield []
            return
        main = torch.cuda.current_stream(stream.device)
        stream.wait_stream(main)
        waits = []
        with torch.cuda.stream(stream):
            yield waits
        for event in waits:
            main.wait_event(event)

    # ---- timing: CUDA events on the copy stream, read back once they have completed ---------------------------
    @staticmethod
    def _record(stream):
        if stream is None:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event

    @contextmanager
    def _timed(self, tier: str, kind: str, stream):
        if stream is None:
            start = time.perf_counter()
            yield
            self._timings.append((tier, kind, time.perf_counter() - start, None))
            return
        start = self._record(stream)
        yield
        self._timings.append((tier, kind, start, self._record(stream)))

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


@dataclass
class StoreEvents:
    """Where one step's stores stand on the store stream, for its loads: an event after each chunk's gather
    (its GPU blocks may be overwritten from then on) and after its host copy (its slots hold the bytes)."""
    gathered: list = field(default_factory=list)
    copied: list = field(default_factory=list)
    block_chunk: dict[int, int] = field(default_factory=dict)   # GPU block read -> its chunk
    slot_chunk: dict[int, int] = field(default_factory=dict)    # pool slot written -> its chunk

    def wait(self, stream, chunk: list[tuple[int, int]]):
        """`stream` (loads) waits until the (slot, GPU block) pairs of `chunk` may be copied."""
        if stream is None:
            return
        k = max((self.block_chunk.get(b, -1) for _, b in chunk), default=-1)
        if k >= 0:
            stream.wait_event(self.gathered[k])
        k = max((self.slot_chunk.get(s, -1) for s, _ in chunk), default=-1)
        if k >= 0:
            stream.wait_event(self.copied[k])


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
