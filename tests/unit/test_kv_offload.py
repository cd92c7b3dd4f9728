"""Block-level KV access and the runner's copies between the KV cache, the CPU pool and the disk tier (CPU).
The same code runs on CUDA with a copy stream; tests/gpu/test_kv_offload_cuda.py checks it there."""
import os
import threading
from dataclasses import dataclass

import pytest
import torch
from transformers import LlamaConfig

from pagedllm.config import EngineConfig
from pagedllm.distributed.parallel_state import TPGroup
from pagedllm.core.messages import DiskOp, KVTransfers
from pagedllm.runner.kv_cache import allocate_kv_caches, bytes_per_block
from pagedllm.runner.kv_disk import DiskStore, model_identity
from pagedllm.runner import kv_offload
from pagedllm.runner.kv_offload import KVOffload, get_kv_from_block, put_kv_into_block

LAYERS, BLOCKS, BS, HEADS, DIM = 3, 10, 4, 2, 8


def random_caches(device="cpu", dtype=torch.float32):
    caches = allocate_kv_caches(LAYERS, BLOCKS, BS, HEADS, DIM, dtype, torch.device(device))
    for c in caches:
        c.normal_()
    return caches


def test_get_and_put_kv_of_blocks_round_trip():
    caches = random_caches()
    kv = get_kv_from_block(caches, [7, 2, 5])
    assert kv.shape == (3, LAYERS, 2, BS, HEADS, DIM)
    for i, b in enumerate([7, 2, 5]):
        for layer in range(LAYERS):
            assert torch.equal(kv[i, layer], caches[layer][:, b])
    assert torch.equal(get_kv_from_block(caches, 2), kv[1])      # one block: no leading dimension
    put_kv_into_block(caches, [0, 1, 9], kv)
    assert torch.equal(get_kv_from_block(caches, [0, 1, 9]), kv)
    put_kv_into_block(caches, 4, kv[0])
    assert torch.equal(get_kv_from_block(caches, 4), kv[0])


@pytest.fixture
def model_dir(tmp_path):
    LlamaConfig(hidden_size=HEADS * 2 * DIM, num_attention_heads=HEADS * 2, num_key_value_heads=HEADS,
                num_hidden_layers=LAYERS, vocab_size=64).to_json_file(tmp_path / "config.json")
    return str(tmp_path)


def make_offload(model_dir, disk_dir=None, tp: TPGroup = TPGroup()):
    caches = random_caches()
    block_bytes = bytes_per_block(LAYERS, BS, HEADS, DIM, torch.float32)
    config = EngineConfig(model=model_dir, block_size=BS, preemption_mode="swap", swap_space=4 * block_bytes / 2**30,
                          kv_offloading_size=4 * block_bytes / 2**30, kv_disk_dir=disk_dir, load_format="dummy")
    hf_config = LlamaConfig.from_pretrained(model_dir)
    return KVOffload(config, hf_config, caches, block_bytes, tp=tp), caches


def test_swap_and_cpu_tier_copies_move_exact_blocks(model_dir):
    off, caches = make_offload(model_dir)
    assert (off.sizes.num_swap_slots, off.sizes.num_cpu_slots) == (4, 4)
    before = get_kv_from_block(caches, [3, 5, 6]).clone()
    stored = off.execute(KVTransfers(swap_out=[(3, 1), (5, 2)], cpu_store=[(6, 7)]))
    for c in caches:
        c.zero_()
    result = off.execute(KVTransfers(swap_in=[(2, 0), (1, 9)], cpu_load=[(7, 4)]))
    assert torch.equal(get_kv_from_block(caches, [9, 0, 4]), before)
    assert set(stored.store_seconds) == {"swap", "cpu"} and set(result.load_seconds) == {"swap", "cpu"}


def test_disk_write_then_verified_read_into_another_slot(model_dir, tmp_path):
    off, _ = make_offload(model_dir, str(tmp_path / "disk"))
    off.execute(KVTransfers(cpu_store=[(2, 5), (3, 6)]))
    off.execute(KVTransfers(disk_ops=[DiskOp(b"a" * 32, 5), DiskOp(b"b" * 32, 6), DiskOp(b"b" * 32, None)]))
    off.flush()
    assert [p.name[:4] for p in off.disk.dir.iterdir()] == ["6161"]           # b was written, then deleted
    result = off.execute(KVTransfers(disk_reads=[(b"a" * 32, 7), (b"b" * 32, 4)]))
    assert result.failed_reads == {b"b" * 32: "missing"}
    assert torch.equal(off.pool[7], off.pool[5])
    assert result.load_seconds["disk"] > 0 and result.store_seconds["disk"] >= 0


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_copies_in_chunks_move_the_same_bytes_through_a_bounded_scratch(model_dir, tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(kv_offload, "COPY_CHUNK_BLOCKS", chunk)
    largest = {"scratch": 0, "gather": 0, "scatter": 0}   # blocks
    scratch, get, put = KVOffload._scratch, kv_offload.get_kv_from_block, kv_offload.put_kv_into_block

    def spy(key, fn, n_of):
        def wrapped(*args):
            out = fn(*args)
            largest[key] = max(largest[key], n_of(args, out))
            return out
        return wrapped
    monkeypatch.setattr(KVOffload, "_scratch", spy("scratch", scratch, lambda a, out: out.shape[0]))
    monkeypatch.setattr(kv_offload, "get_kv_from_block", spy("gather", get, lambda a, out: len(a[1])))
    monkeypatch.setattr(kv_offload, "put_kv_into_block", spy("scatter", put, lambda a, out: len(a[1])))

    torch.manual_seed(0)
    off, caches = make_offload(model_dir, str(tmp_path / "disk"))
    before = get_kv_from_block(caches, [9, 1, 2, 3, 4, 5, 6, 7]).clone()
    # Slots out of order and not all consecutive; disk writes from GPU blocks share the scratch.
    off.execute(KVTransfers(swap_out=[(9, 3), (1, 0), (2, 1), (3, 2)], cpu_store=[(4, 7), (5, 4), (6, 5), (7, 6)],
                            disk_ops=[DiskOp(bytes([i]) * 32, gpu_block=b) for i, b in enumerate([1, 8, 0])]))
    for c in caches:
        c.zero_()
    off.execute(KVTransfers(swap_in=[(3, 0), (0, 1), (1, 2), (2, 3)], cpu_load=[(7, 9), (4, 8), (5, 7), (6, 6)]))
    assert torch.equal(get_kv_from_block(caches, [0, 1, 2, 3, 9, 8, 7, 6]), before)
    off.flush()
    assert torch.equal(torch.frombuffer(bytearray(off.disk.files.path(b"\0" * 32).read_bytes()[88:]),
                                        dtype=torch.float32).view(before[1].shape), before[1])
    bound = min(chunk, 4)   # no call moves more than 4 blocks of one tier
    assert largest == {"scratch": bound, "gather": bound, "scatter": bound}


def test_copy_scratch_bound_is_one_chunk_and_one_layer_of_it():
    assert kv_offload.copy_scratch_bytes(2 << 20, 32) == kv_offload.COPY_CHUNK_BLOCKS * (2 << 20) * 33 // 32


def write_block(store, h, fill):
    payload = torch.full((store.block_bytes,), fill, dtype=torch.uint8).numpy()
    store.write(h, payload)
    store.flush()
    return payload


def read(store, h):
    out = torch.zeros(store.block_bytes, dtype=torch.uint8).numpy()
    return store.read_many([(h, out)]).get(h), out


def test_disk_store_rejects_corrupt_truncated_and_foreign_files(tmp_path):
    store = DiskStore(str(tmp_path), b"I" * 32, 64)
    for i, h in enumerate([b"1" * 32, b"2" * 32, b"3" * 32, b"4" * 32]):
        write_block(store, h, i + 1)
    reason, out = read(store, b"1" * 32)
    assert reason is None and (out == 1).all()

    path = store.files.path(b"2" * 32)                  # flip one payload byte
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert read(store, b"2" * 32)[0] == "checksum mismatch" and not path.exists()

    path = store.files.path(b"3" * 32)                  # a file of another model, under this model's name
    other = DiskStore(str(tmp_path / "other"), b"J" * 32, 64)
    write_block(other, b"3" * 32, 9)
    os.replace(other.files.path(b"3" * 32), path)
    assert read(store, b"3" * 32)[0].startswith("foreign") and not path.exists()

    path = store.files.path(b"4" * 32)                  # truncated: found at start-up, removed
    path.write_bytes(path.read_bytes()[:-5])
    (store.dir / "junk.kvb.123.tmp").write_bytes(b"x")
    hashes, num_removed = DiskStore(str(tmp_path), b"I" * 32, 64).scan()
    assert hashes == [b"1" * 32] and num_removed == 2 and not path.exists()
    assert read(store, b"4" * 32)[0] == "missing"


def test_disk_scan_passes_over_directories(tmp_path):
    """A directory in the tier's directory (one named like a block file too) is no block: start-up neither
    crashes on it (IsADirectoryError from unlink) nor lists it."""
    store = DiskStore(str(tmp_path), b"I" * 32, 64)
    write_block(store, b"1" * 32, 1)
    (store.dir / "stray").mkdir()
    store.files.path(b"2" * 32).mkdir()
    hashes, num_removed = DiskStore(str(tmp_path), b"I" * 32, 64).scan()
    assert hashes == [b"1" * 32] and num_removed == 0
    assert read(store, b"1" * 32)[0] is None


def test_a_kv_disk_dir_that_cannot_be_made_is_an_error_naming_it(tmp_path):
    """Under a file (or read-only, or out of space): a ValueError naming kv_disk_dir at start-up, not a bare
    NotADirectoryError, nor an engine whose writer thread then fails every block."""
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="kv_disk_dir must be a directory this process can create and write"):
        DiskStore(str(tmp_path / "afile" / "kv"), b"I" * 32, 64)


def test_disk_clear_deletes_this_models_files_in_queue_order(tmp_path):
    store, other = DiskStore(str(tmp_path), b"I" * 32, 64), DiskStore(str(tmp_path), b"J" * 32, 64)
    write_block(other, b"1" * 32, 1)
    store.write(b"1" * 32, torch.ones(64, dtype=torch.uint8).numpy())   # queued before the clear: deleted
    store.clear()
    store.write(b"2" * 32, torch.ones(64, dtype=torch.uint8).numpy())   # queued after it: kept
    store.flush()
    assert [p.name[:2] for p in store.dir.iterdir()] == ["32"]
    assert other.files.path(b"1" * 32).exists()


def test_model_identity_tells_dtype_block_size_and_weights_apart(model_dir):
    hf_config = LlamaConfig.from_pretrained(model_dir)
    base = model_identity(model_dir, hf_config, torch.float32, 16, "dummy", "cpu")
    assert base == model_identity(model_dir, hf_config, torch.float32, 16, "dummy", "cpu")
    assert base != model_identity(model_dir, hf_config, torch.bfloat16, 16, "dummy", "cpu")
    assert base != model_identity(model_dir, hf_config, torch.float32, 32, "dummy", "cpu")
    weights = os.path.join(model_dir, "model.safetensors")
    with open(weights, "wb") as f:
        f.write(b"\0" * 100)
    first = model_identity(model_dir, hf_config, torch.float32, 16, "auto", "cpu")
    with open(weights, "r+b") as f:
        f.write(b"\1")
    assert first != model_identity(model_dir, hf_config, torch.float32, 16, "auto", "cpu")


def test_consecutive_slots_are_copied_in_one_run():
    from pagedllm.runner.kv_offload import _runs
    assert _runs([4, 5, 6, 9, 10, 2]) == [(0, 4, 3), (3, 9, 2), (5, 2, 1)]


def test_a_store_that_raises_leaves_the_disk_writer_serving(model_dir, tmp_path, monkeypatch):
    """A step whose copies out of the GPU raise (pinned host memory that cannot be allocated) has queued disk
    writes whose bytes never come: the writer thread waited for them for ever, so every later write, read of a
    queued block and flush waited too (the engine core's step hung). Those blocks are now not written (a read
    finds them missing, and they are recomputed); the writer goes on."""
    off, caches = make_offload(model_dir, str(tmp_path / "disk"))
    get = kv_offload.get_kv_from_block

    def no_host_memory(*args):
        raise RuntimeError("CUDA error: out of memory (pinned host allocation)")
    monkeypatch.setattr(kv_offload, "get_kv_from_block", no_host_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        off.execute(KVTransfers(disk_ops=[DiskOp(b"a" * 32, gpu_block=1)]))
    monkeypatch.setattr(kv_offload, "get_kv_from_block", get)
    off.execute(KVTransfers(disk_ops=[DiskOp(b"b" * 32, gpu_block=2)]))
    flushed = threading.Thread(target=off.flush, daemon=True)
    flushed.start()
    flushed.join(timeout=10)
    assert not flushed.is_alive(), "the disk writer waits for the failed step's bytes for ever"
    result = off.execute(KVTransfers(disk_reads=[(b"a" * 32, 7), (b"b" * 32, 4)]))
    assert result.failed_reads == {b"a" * 32: "missing"}
    assert torch.equal(off.pool[4].view(-1), get_kv_from_block(caches, 2).reshape(-1))


@dataclass(frozen=True)
class RankZeroOfTwo(TPGroup):
    """Rank 0 of 2 in one process: rank 1's part of each gather is the next object in `theirs`."""
    theirs: list = None

    def gather_objects(self, obj) -> list:
        return [obj, self.theirs.pop(0)]


def test_under_tp_a_disk_block_is_one_only_while_every_rank_holds_it(model_dir, tmp_path):
    """Rank r of N has a directory of its own. At start a block whose file rank 1 lacks (it stopped before its
    write was done) is no block: its file here goes. A read that fails on rank 1 alone fails here too, and this
    rank's good file goes with it (the scheduler forgets the block). Sizes: kv_offloading_size over both ranks,
    swap_space a rank's; the stats' block bytes are both ranks' shares."""
    a, b, c = b"a" * 32, b"b" * 32, b"c" * 32
    hf_config = LlamaConfig.from_pretrained(model_dir)
    ids = {model_identity(model_dir, hf_config, torch.float32, BS, "dummy", "cpu", tp_rank=r, tp_size=n)
           for r, n in ((0, 1), (0, 2), (1, 2))}
    assert len(ids) == 3
    block_bytes = bytes_per_block(LAYERS, BS, HEADS, DIM, torch.float32)
    mine = DiskStore(str(tmp_path), model_identity(model_dir, hf_config, torch.float32, BS, "dummy", "cpu",
                                                   tp_rank=0, tp_size=2), block_bytes)
    for i, h in enumerate((a, b)):
        mine.write(h, torch.full((block_bytes,), i + 1, dtype=torch.uint8).numpy())
    mine.flush()
    tp = RankZeroOfTwo(0, 2, theirs=[([b, c], 1)])     # rank 1 found b and c, and removed one bad file
    off, caches = make_offload(model_dir, str(tmp_path), tp)
    assert (off.sizes.disk_hashes, off.sizes.num_invalid_files) == ([b], 1)
    assert (off.sizes.num_swap_slots, off.sizes.num_cpu_slots, off.sizes.block_bytes) == (4, 2, 2 * block_bytes)
    off.flush()
    assert not mine.files.path(a).exists() and mine.files.path(b).exists()

    tp.theirs.append({b: "checksum mismatch"})
    result = off.execute(KVTransfers(disk_reads=[(b, 4)]))
    assert result.failed_reads == {b: "checksum mismatch"}
    off.flush()
    assert not mine.files.path(b).exists()
