"""The disk tier's files: one KV block a file, written atomically by a background thread, verified when read.

    <kv_disk_dir>/<model identity, 32 hex>/<block hash, 64 hex>.kvb
    file = header | payload (the block's CPU slot bytes: num_layers x K,V x block_size x kv_heads x head_dim)
    header = magic, format version, model identity, block hash, payload bytes, crc32 of the header fields
             and the payload

A file is written as <name>.<pid>.tmp and renamed, so a reader sees a whole file or none. A file that is
truncated, fails its checksum, or names another model or another block is removed and reported, never
loaded. reset_prefix_cache deletes every block file of the model's directory, in the writer's queue order. One
engine writes a directory at a time (a second one would count the same bytes against its limit).
"""
import hashlib
import json
import logging
import os
import queue
import struct
import threading
import time
import weakref
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pagedllm.models import model_dims

logger = logging.getLogger("pagedllm")

_MAGIC = b"PGLLMKV\0"
_VERSION = 1
_HEADER = struct.Struct("<8sI32s32sQI")   # magic, version, identity, block hash, payload bytes, crc32
_SUFFIX = ".kvb"
_SAMPLE = 1 << 20                         # bytes of each weight file hashed at 3 places (see model_identity)
_ALL = b""                                # the "block hash" of a queued delete of every block file


def model_identity(model_dir: str, hf_config, dtype, block_size: int, load_format: str, device_type: str,
                   quantization: str | None = None, model_dtype=None, hf_overrides: dict | None = None,
                   tp_rank: int = 0, tp_size: int = 1) -> bytes:
    """Names whose KV a block file holds: same config, weights, quantization, KV dtype (an fp8 block is never
    read as bf16), the dtype the model computes in when it is not the KV dtype (an fp8 cache's blocks from a
    bf16 model hold other values than from a float32 one), block size and KV shape, same identity.
    Weight files are identified by name, size and three 1 MiB samples (start, middle, end): reading every
    byte of a 16 GB checkpoint at start-up would cost more than the tier saves. Under tensor parallelism a
    rank's blocks hold its own KV heads: rank r of N has an identity (a directory) of its own, so no two ranks
    ever share a file."""
    key = (_VERSION, str(dtype), block_size, model_dims(hf_config))
    if quantization is not None:
        key += (quantization,)
    if model_dtype is not None and model_dtype != dtype:
        key += (f"model dtype {model_dtype}",)
    if tp_size > 1:   # TP=1's identity stays what it was: its files on disk stay hits
        key += (f"tensor-parallel rank {tp_rank} of {tp_size}",)
    h = hashlib.sha256(repr(key).encode())
    config_path = Path(model_dir) / "config.json"
    h.update(json.dumps(json.loads(config_path.read_text()), sort_keys=True).encode())
    if hf_overrides:   # a rope or shape changed at load computes other KV from the same files
        h.update(json.dumps(hf_overrides, sort_keys=True).encode())
    if load_format == "dummy":   # seeded random weights: the same on the same kind of device
        h.update(f"dummy:{device_type}".encode())
        return h.digest()
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        size = path.stat().st_size
        h.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            for offset in (0, max(0, size // 2 - _SAMPLE // 2), max(0, size - _SAMPLE)):
                f.seek(offset)
                h.update(f.read(_SAMPLE))
    return h.digest()


class PendingPayload:
    """A block's bytes that a device copy is still producing: the writer thread waits for them."""

    def __init__(self):
        self.array: np.ndarray | None = None
        self._filled = threading.Event()
        self._copy_done = None   # e.g. a torch.cuda.Event recorded after the copy into `array`

    def fill(self, array: np.ndarray, copy_done=None):
        self.array, self._copy_done = array, copy_done
        self._filled.set()

    def abandon(self):
        """The copy failed (its step raised): the writer skips the block instead of waiting for it for ever (a
        filled one, whose `array` is set, is written as before)."""
        self._filled.set()

    def wait(self) -> np.ndarray | None:
        """The bytes, or None for an abandoned copy."""
        self._filled.wait()
        if self._copy_done is not None:
            self._copy_done.synchronize()
        return self.array


class _Files:
    """The directory and its bookkeeping shared with the writer thread (which must not keep the DiskStore
    alive: dropping the store is what stops the thread)."""

    def __init__(self, directory: Path, identity: bytes):
        self.dir = directory
        self.identity = identity
        self.pending: dict[bytes, int] = {}      # block hash -> queued writes and deletes not done yet
        self.cond = threading.Condition()
        self.write_seconds = 0.0

    def path(self, block_hash: bytes) -> Path:
        return self.dir / (block_hash.hex() + _SUFFIX)

    def write(self, block_hash: bytes, payload: np.ndarray):
        fields = (_MAGIC, _VERSION, self.identity, block_hash, payload.nbytes)
        crc = zlib.crc32(payload, zlib.crc32(_HEADER.pack(*fields, 0)))
        final = self.path(block_hash)
        tmp = final.with_name(f"{final.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(_HEADER.pack(*fields, crc))
                f.write(payload)
            os.replace(tmp, final)
        except OSError as e:   # disk full, directory gone: the block is simply not in the tier
            logger.warning("disk tier: writing %s failed (%s)", final.name, e)
            _remove(tmp)

    def done(self, block_hash: bytes, seconds: float):
        with self.cond:
            self.write_seconds += seconds
            self.pending[block_hash] -= 1
            if not self.pending[block_hash]:
                del self.pending[block_hash]
            self.cond.notify_all()


class DiskStore:
    def __init__(self, root: str, identity: bytes, block_bytes: int, num_read_threads: int = 4):
        directory = Path(root) / identity.hex()[:32]
        try:   # the setting's error here, not a writer thread's warning on every block later
            directory.mkdir(parents=True, exist_ok=True)
            probe = directory / f".probe.{os.getpid()}.tmp"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise ValueError(f"kv_disk_dir must be a directory this process can create and write, got {root!r} "
                             f"({e.strerror or e}: {e.filename or directory})") from e
        self.files = _Files(directory, identity)
        self.block_bytes = block_bytes
        self.file_bytes = _HEADER.size + block_bytes
        self._jobs: queue.Queue = queue.Queue()
        self._writer = threading.Thread(target=_write_loop, args=(self._jobs, self.files), daemon=True,
                                        name="pagedllm-kv-disk-writer")
        self._writer.start()
        self._readers = ThreadPoolExecutor(num_read_threads, thread_name_prefix="pagedllm-kv-disk-reader")
        # At exit, or when the store is dropped: finish the queued writes, then stop the threads.
        weakref.finalize(self, _stop, self._jobs, self._writer, self._readers)

    @property
    def dir(self) -> Path:
        return self.files.dir

    def scan(self) -> tuple[list[bytes], int]:
        """Block hashes on disk, least recently used (oldest mtime) first, and the number of files removed
        because no complete block can be in them (wrong size, foreign name, a write that never finished)."""
        found, num_removed = [], 0
        for entry in os.scandir(self.dir):
            name, ok = entry.name, False
            if entry.is_dir(follow_symlinks=False):
                continue   # not a block file, nor ours to remove: never read
            if name.endswith(_SUFFIX) and len(name) == 64 + len(_SUFFIX):
                try:
                    block_hash = bytes.fromhex(name[:64])
                    ok = entry.stat().st_size == self.file_bytes
                except ValueError:
                    pass
            if ok:
                found.append((entry.stat().st_mtime_ns, block_hash))
            else:
                _remove(Path(entry.path))
                num_removed += 1
        return [h for _, h in sorted(found)], num_removed

    # ---- writes and deletes: queued, done in order by one thread --------------------------------------------
    def write(self, block_hash: bytes, payload: np.ndarray | PendingPayload):
        """payload: a private copy of the block's bytes (uint8), owned by the writer from now on."""
        self._enqueue(block_hash, payload)

    def delete(self, block_hash: bytes):
        self._enqueue(block_hash, None)

    def clear(self):
        """Delete every block file of this model identity (its directory only: other models' files stay),
        after the writes and deletes queued before."""
        self._enqueue(_ALL, None)

    def _enqueue(self, block_hash: bytes, payload):
        with self.files.cond:
            self.files.pending[block_hash] = self.files.pending.get(block_hash, 0) + 1
        self._jobs.put((block_hash, payload))

    def flush(self):
        """Wait until every queued write and delete is done."""
        with self.files.cond:
            self.files.cond.wait_for(lambda: not self.files.pending)

    def take_write_seconds(self) -> float:
        with self.files.cond:
            seconds, self.files.write_seconds = self.files.write_seconds, 0.0
        return seconds

    # ---- reads: verified, in parallel ---------------------------------------------------------------------
    def read_many(self, reads: list[tuple[bytes, np.ndarray]]) -> dict[bytes, str]:
        """Fill each out array (uint8, block_bytes) from its block's file; returns hash -> reason for every
        read that failed. A bad file is removed; its out array then holds nothing."""
        results = self._readers.map(lambda r: self._read(*r), reads)
        return {h: reason for (h, _), reason in zip(reads, results) if reason is not None}

    def _read(self, block_hash: bytes, out: np.ndarray) -> str | None:
        with self.files.cond:   # a write or delete of this block still queued goes first
            self.files.cond.wait_for(lambda: block_hash not in self.files.pending)
        path = self.files.path(block_hash)
        try:
            with open(path, "rb") as f:
                header = f.read(_HEADER.size)
                num_read = f.readinto(memoryview(out))
                extra = f.read(1)
        except FileNotFoundError:
            return "missing"
        except OSError as e:
            return f"unreadable ({e})"
        reason = self._check(header, num_read, extra, block_hash, out)
        if reason is not None:
            _remove(path)
            return reason
        os.utime(path)   # the LRU order of the tier survives a restart through mtimes
        return None

    def _check(self, header: bytes, num_read: int, extra: bytes, block_hash: bytes, out: np.ndarray) -> str | None:
        if len(header) < _HEADER.size or num_read != self.block_bytes or extra:
            return "truncated or wrong size"
        magic, version, identity, stored_hash, nbytes, crc = _HEADER.unpack(header)
        if magic != _MAGIC or version != _VERSION or nbytes != self.block_bytes:
            return "not a block file of this format"
        if identity != self.files.identity or stored_hash != block_hash:
            return "foreign (another model or another block)"
        if zlib.crc32(out, zlib.crc32(_HEADER.pack(magic, version, identity, stored_hash, nbytes, 0))) != crc:
            return "checksum mismatch"
        return None


def _write_loop(jobs: queue.Queue, files: _Files):
    while (job := jobs.get()) is not None:
        block_hash, payload = job
        start = time.perf_counter()
        try:
            if isinstance(payload, PendingPayload):
                payload = payload.wait()
                start = time.perf_counter()
                if payload is None:   # abandoned: not written, a read finds it missing (a file of it stays)
                    continue
            if block_hash == _ALL:
                for path in files.dir.glob("*" + _SUFFIX):
                    _remove(path)
            elif payload is None:
                _remove(files.path(block_hash))
            else:
                files.write(block_hash, payload)
        finally:   # readers and flush() wait on it
            files.done(block_hash, time.perf_counter() - start)


def _stop(jobs: queue.Queue, writer: threading.Thread, readers: ThreadPoolExecutor):
    jobs.put(None)
    writer.join()
    readers.shutdown(wait=True)


def _remove(path: Path):
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as e:   # not removable (permissions, a directory): the tier goes on without it
        logger.warning("disk tier: removing %s failed (%s)", path.name, e)
