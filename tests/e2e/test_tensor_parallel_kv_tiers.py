"""The KV tiers at tensor_parallel_size 2 (CPU, gloo, float32, a tiny random Llama with 2 KV heads: one a rank).
Rank 0's scheduler decides the copies; every rank moves its own heads' share of the same blocks, into a CPU pool
and a disk directory of its own. Greedy tokens equal TP=1's with the same settings (itself checked against the
plain engine in test_kv_tiers.py); the tier stats count the whole block (both ranks' bytes),
so they equal TP=1's."""
import time
from pathlib import Path

import pytest

from pagedllm import LLM
from pagedllm.request import Request
from test_kv_tiers import BLOCK_BYTES, BS, GREEDY, gib, prompts_of, tokens

pytestmark = pytest.mark.usefixtures("one_thread_per_rank")

PREEMPTING = dict(dtype="float32", device="cpu", log_stats_interval=0, block_size=BS, num_gpu_blocks_override=14,
                  enable_prefix_caching=False)   # off: a resumed request loads its blocks, no prefix hit
PROMPTS = prompts_of([30, 45, 20, 60, 33, 50])


def counts(llm: LLM) -> dict:
    """Each tier's counts (not its seconds)."""
    return {tier: (s.hits, s.misses, s.invalid, s.bytes_stored, s.bytes_loaded)
            for tier, s in llm.engine.get_stats().kv_tiers.items()}


def rank_dirs(llm: LLM, disk_dir: Path) -> list[Path]:
    """Rank 0's and rank 1's block directories (each rank has a model identity of its own)."""
    own = llm.engine.runner.kv_offload.disk.dir
    others = [p for p in disk_dir.iterdir() if p != own]
    assert len(others) == 1
    return [own, others[0]]


def names(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir() if p.suffix == ".kvb"}


def wait_for(condition, seconds: float = 10.0):
    """Rank 1's disk writer thread is in another process: poll for what its queued writes leave."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "rank 1's disk tier never got there"
        time.sleep(0.05)


@pytest.mark.parametrize("mode", ["swap", "offload"])
def test_swap_and_offload_preemption_at_tp2(tiny_model_dirs, tmp_path, mode):
    """A KV cache of 14 blocks preempts: swapped or offloaded requests come back with TP=1's tokens and stats.
    Offload: both ranks write the same blocks, each into its own directory; reset_prefix_cache deletes both."""
    d = tiny_model_dirs["llama"]
    kw = dict(PREEMPTING, preemption_mode=mode)
    if mode == "swap":
        kw.update(swap_space=gib(64))
    tp1_kw = dict(kw, kv_offloading_size=gib(4), kv_disk_dir=str(tmp_path / "tp1")) if mode == "offload" else kw
    tp1 = LLM(d, **tp1_kw)
    expected, expected_counts = tokens(tp1, PROMPTS), counts(tp1)

    disk = tmp_path / "tp2"
    llm = LLM(d, tensor_parallel_size=2, **dict(tp1_kw, kv_disk_dir=str(disk)) if mode == "offload" else kw)
    try:
        assert tokens(llm, PROMPTS) == expected
        assert counts(llm) == expected_counts
        tier = "swap" if mode == "swap" else "disk"
        assert llm.engine.get_stats().kv_tiers[tier].hits > 0
        if mode == "offload":
            llm.engine.runner.kv_offload.flush()
            rank0, rank1 = rank_dirs(llm, disk)
            assert names(rank0)
            wait_for(lambda: names(rank1) == names(rank0))
            assert llm.reset_prefix_cache()
            llm.engine.runner.kv_offload.flush()
            assert not names(rank0)
            wait_for(lambda: not names(rank1))
    finally:
        llm.shutdown()


def scenario(llm: LLM, disk: Path) -> tuple[list[list[int]], list[dict], list[Path]]:
    """A prefix is evicted from the GPU into the CPU tier and comes back from it; pushed on to the disk tier,
    one of its blocks' files is corrupted on the last rank only, and it comes back from disk without it.
    Returns the tokens, the counts after each return, and the corrupted block's file on each rank."""
    prefix = prompts_of([80], seed=1)[0]                  # 10 full blocks
    asks = [prefix + s for s in prompts_of([5, 7, 3], seed=2)]
    off = llm.engine.scheduler.offload
    out, stats = tokens(llm, asks[:1]), []
    tokens(llm, prompts_of([60], seed=3))                 # evicts part of the prefix from the GPU
    out += tokens(llm, asks[1:2])
    stats.append(counts(llm))
    tokens(llm, prompts_of([60] * 4, seed=4))             # pushes the prefix on to the disk tier
    llm.engine.runner.kv_offload.flush()
    hashes = Request("x", prefix, GREEDY, 1, BS).block_hashes[:10]
    on_disk = [h for h in hashes if h in off.disk and off.cpu_pool.get_cached_block(h) is None]
    assert len(on_disk) >= 3
    dirs = [llm.engine.runner.kv_offload.disk.dir] if llm.engine.config.tensor_parallel_size == 1 \
        else rank_dirs(llm, disk)
    bad = dirs[-1] / (on_disk[1].hex() + ".kvb")
    wait_for(lambda: bad.exists() and bad.stat().st_size > 0)
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0x01
    bad.write_bytes(bytes(data))
    out += tokens(llm, asks[2:3])
    llm.engine.runner.kv_offload.flush()
    stats.append(counts(llm))
    return out, stats, [directory / bad.name for directory in dirs]


def test_cpu_and_disk_tiers_of_the_prefix_cache_at_tp2(tiny_model_dirs, tmp_path):
    """Hits from the CPU tier, then from the disk tier, at TP=2 as at TP=1 (tokens and counts); a block file
    that is bad on one rank alone is a failed read on every rank (else rank 0 would load its share and rank 1
    would attend to whatever its slot held)."""
    d = tiny_model_dirs["llama"]
    kw = dict(dtype="float32", device="cpu", log_stats_interval=0, block_size=BS, num_gpu_blocks_override=16,
              kv_offloading_size=gib(10))
    expected, expected_stats, _ = scenario(LLM(d, **kw, kv_disk_dir=str(tmp_path / "tp1")), tmp_path / "tp1")
    assert expected_stats[0]["cpu"][0] > 0                       # CPU tier hits
    assert expected_stats[1]["disk"][0] > 0 and expected_stats[1]["disk"][2] == 1   # disk hits, the bad file
    llm = LLM(d, tensor_parallel_size=2, **kw, kv_disk_dir=str(tmp_path / "tp2"))
    try:
        assert llm.engine.scheduler.offload.cpu_pool.num_blocks == 10   # kv_offloading_size: both ranks' bytes
        got, stats, bad_files = scenario(llm, tmp_path / "tp2")
        assert got == expected
        assert stats == expected_stats
        assert stats[0]["cpu"][4] == stats[0]["cpu"][0] * BLOCK_BYTES   # the whole block's bytes
        for path in bad_files:   # gone from every rank's directory (rank 0 had read its share fine)
            wait_for(lambda: not path.exists())
    finally:
        llm.shutdown()
