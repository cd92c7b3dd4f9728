"""The KV hierarchy end to end on a tiny random Llama (float32, CPU): swap and offload preemption, the CPU and
disk tiers of the prefix cache, a restart on the same kv_disk_dir, bad block files. Greedy tokens are compared
with the plain engine (recompute, a KV cache that never preempts), itself checked against transformers in
test_vs_transformers.py."""
import numpy as np
import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.core.scheduler import Scheduler
from pagedllm.request import Request
from pagedllm.runner import kv_offload
from pagedllm.runner.kv_disk import DiskStore
from pagedllm.server.metrics import ServerMetrics

BS = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=32)
BLOCK_BYTES = 2 * 2 * BS * 2 * 16 * 4     # layers x K,V x block_size x kv_heads x head_dim x float32
FILE_BYTES = 88 + BLOCK_BYTES             # + the block file's header


def gib(num_blocks: int, block_bytes: int = BLOCK_BYTES) -> float:
    return num_blocks * block_bytes / 2**30


def tokens(llm: LLM, prompts) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def plain(model_dir, prompts) -> list[list[int]]:
    return tokens(LLM(model_dir, dtype="float32", log_stats_interval=0), prompts)


def assert_no_leaks(llm: LLM):
    engine = llm.engine
    engine.runner.kv_offload.flush()
    stats = engine.get_stats()
    assert stats.num_blocks_free == stats.num_blocks_total
    off = engine.scheduler.offload
    assert off.swap_pool.num_free_blocks == off.swap_pool.num_blocks
    assert off.cpu_pool.num_free_blocks == off.cpu_pool.num_blocks      # no slot left pinned
    assert not off.swapped and not off._reading
    if off.disk is not None:
        on_disk = {p.name for p in engine.runner.kv_offload.disk.dir.iterdir()}
        assert on_disk == {h.hex() + ".kvb" for h in off.disk.lru}


def prompts_of(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 512, size=n).tolist() for n in lengths]


@pytest.fixture
def preempted_ids(monkeypatch):
    ids = set()
    preempt = Scheduler._preempt

    def spy(self, req):
        ids.add(req.request_id)
        preempt(self, req)
    monkeypatch.setattr(Scheduler, "_preempt", spy)
    return ids


@pytest.mark.parametrize("mode,chunk", [("recompute", None), ("swap", None), ("offload", None),
                                        ("swap", 1), ("offload", 1)])
def test_preemption_modes_give_identical_greedy_outputs(tiny_model_dirs, tmp_path, monkeypatch, preempted_ids,
                                                        mode, chunk):
    if chunk is not None:   # every tier copy one block at a time
        monkeypatch.setattr(kv_offload, "COPY_CHUNK_BLOCKS", chunk)
    d = tiny_model_dirs["llama"]
    prompts = prompts_of([30, 45, 20, 60, 33, 50])
    # Prefix caching off: a resumed request cannot find its own blocks by hash, so it really loads them.
    kw = {"dtype": "float32", "log_stats_interval": 0, "block_size": BS, "num_gpu_blocks_override": 14,
          "enable_prefix_caching": False, "preemption_mode": mode}
    if mode == "swap":
        kw.update(swap_space=gib(64))
    if mode == "offload":
        kw.update(kv_offloading_size=gib(4), kv_disk_dir=str(tmp_path))
    llm = LLM(d, **kw)
    assert tokens(llm, prompts) == plain(d, prompts)
    # Every request but the first: the oldest running request is never the newest, so never preempted.
    assert preempted_ids == {str(i) for i in range(1, len(prompts))}
    tiers = llm.engine.get_stats().kv_tiers
    if mode == "swap":
        assert tiers["swap"].hits > 0 and tiers["swap"].misses == 0
    if mode == "offload":
        assert tiers["disk"].bytes_stored > 0 and tiers["cpu"].hits + tiers["disk"].hits > 0
    if mode != "recompute":
        assert_no_leaks(llm)


def block_files(llm: LLM, prompt: list[int], num_blocks: int):
    hashes = Request("x", prompt, GREEDY, 1, BS).block_hashes[:num_blocks]
    return [llm.engine.runner.kv_offload.disk.files.path(h) for h in hashes]


def test_disk_tier_survives_a_restart_and_bad_files_are_recomputed(tiny_model_dirs, tmp_path):
    d = tiny_model_dirs["llama"]
    prefix = prompts_of([80], seed=1)[0]                  # 10 full blocks
    asks = [prefix + s for s in prompts_of([5, 7, 3], seed=2)]
    expected = plain(d, asks)
    # Disk hits are staged in the CPU tier: it holds the 10 blocks of the prefix.
    kw = {"dtype": "float32", "log_stats_interval": 0, "block_size": BS, "num_gpu_blocks_override": 16,
          "kv_offloading_size": gib(10), "kv_disk_dir": str(tmp_path)}

    first = LLM(d, **kw)
    assert tokens(first, asks[:1]) == expected[:1]
    tokens(first, prompts_of([60] * 4, seed=3))          # pushes the prefix out of the GPU and the CPU tier
    assert_no_leaks(first)
    files = block_files(first, prefix, 10)
    assert all(f.exists() for f in files)

    second = LLM(d, **kw)                                 # a new engine: only the disk holds the prefix
    assert tokens(second, asks[1:2]) == expected[1:2]
    disk = second.engine.get_stats().kv_tiers["disk"]
    assert disk.hits == 10 and disk.misses == 0 and disk.bytes_loaded == 10 * BLOCK_BYTES
    assert_no_leaks(second)

    data = bytearray(files[2].read_bytes())               # corrupt block 2, truncate 5, delete 8
    data[len(data) // 2] ^= 0x01
    files[2].write_bytes(bytes(data))
    files[5].write_bytes(files[5].read_bytes()[:-1])
    files[8].unlink()
    third = LLM(d, **kw)
    assert tokens(third, asks[2:3]) == expected[2:3]
    disk = third.engine.get_stats().kv_tiers["disk"]
    assert disk.hits >= 2 and disk.misses == 1 and disk.invalid == 2   # truncated: at start; corrupt: on read
    assert not files[2].exists() and not files[5].exists()
    assert third.engine.get_stats().num_prompt_tokens == len(asks[2]) - 2 * BS   # all but blocks 0 and 1
    assert_no_leaks(third)
    text = ServerMetrics("m").render(third.engine.get_stats()).decode()   # the same counts on /metrics
    assert f'pagedllm:kv_tier_hits_total{{engine="0",model_name="m",tier="disk"}} {float(disk.hits)}' in text
    assert 'pagedllm:kv_tier_invalid_total{engine="0",model_name="m",tier="disk"} 2.0' in text
    assert 'pagedllm:kv_tier_loaded_bytes_total{engine="0",model_name="m",tier="cpu"} ' in text


def disk_bytes(disk_dir) -> int:
    """Bytes of the files in disk_dir, temp files included. The tier's writer thread deletes evicted files
    while this runs: a file gone between the listing and its stat holds nothing."""
    total = 0
    for f in disk_dir.iterdir():
        try:
            total += f.stat().st_size
        except FileNotFoundError:
            pass
    return total


def test_disk_tier_never_exceeds_kv_disk_gb(tiny_model_dirs, tmp_path):
    d = tiny_model_dirs["llama"]
    prompts = prompts_of([40] * 8, seed=4)
    llm = LLM(d, dtype="float32", log_stats_interval=0, block_size=BS, num_gpu_blocks_override=16,
              kv_offloading_size=gib(2), kv_disk_dir=str(tmp_path), kv_disk_gb=gib(6, FILE_BYTES))
    disk_dir = llm.engine.runner.kv_offload.disk.dir
    for i, p in enumerate(prompts):
        llm.engine.add_request(str(i), p, GREEDY)
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
        assert disk_bytes(disk_dir) <= 6 * FILE_BYTES
    assert llm.engine.get_stats().kv_tiers["disk"].bytes_stored > 6 * BLOCK_BYTES   # it did evict
    assert_no_leaks(llm)
    assert len(list(disk_dir.iterdir())) == 6


def test_reset_prefix_cache_forgets_the_cpu_and_disk_tiers(tiny_model_dirs, tmp_path):
    d = tiny_model_dirs["llama"]
    prefix = prompts_of([80], seed=1)[0]                  # 10 full blocks
    asks = [prefix + s for s in prompts_of([5, 7], seed=2)]
    expected = plain(d, asks)
    kw = {"dtype": "float32", "log_stats_interval": 0, "block_size": BS, "num_gpu_blocks_override": 16,
          "kv_offloading_size": gib(10), "kv_disk_dir": str(tmp_path)}
    foreign = DiskStore(str(tmp_path), b"O" * 32, 64)     # another model identity in the same kv_disk_dir
    foreign.write(b"f" * 32, np.ones(64, dtype=np.uint8))
    foreign.flush()

    llm = LLM(d, **kw)
    engine, off = llm.engine, llm.engine.scheduler.offload
    assert tokens(llm, asks[:1]) == expected[:1]
    tokens(llm, prompts_of([60] * 4, seed=3))            # pushes the prefix out of the GPU and the CPU tier
    prefix_hashes = Request("x", prefix, GREEDY, 1, BS).block_hashes[:10]

    def disk_holds_the_prefix() -> bool:
        return all(h in off.disk for h in prefix_hashes)
    assert disk_holds_the_prefix() and off.cpu_pool.cached_blocks

    # Steps are pipelined: after its first step, "r" waits for its disk reads, whose result is not applied
    # yet. It holds no GPU block, but the reads pin CPU slots: no reset.
    engine.add_request("r", asks[1], GREEDY)
    engine.step()
    assert off._reading and engine.get_stats().num_blocks_free == engine.get_stats().num_blocks_total
    assert not llm.reset_prefix_cache() and disk_holds_the_prefix()
    while not engine.scheduler.running:                  # admitted once the reads are applied
        engine.step()
    assert not llm.reset_prefix_cache()                  # a running request holds GPU blocks
    assert disk_holds_the_prefix() and off.cpu_pool.cached_blocks   # nothing was forgotten
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.finished]
    assert outputs[0].outputs[0].token_ids == expected[1]
    before = engine.get_stats()
    assert before.kv_tiers["disk"].hits == 10

    assert llm.reset_prefix_cache()
    engine.runner.kv_offload.flush()
    assert not off.cpu_pool.cached_blocks and not off.disk.lru
    assert not list(engine.runner.kv_offload.disk.dir.iterdir())   # no block file of this model is left
    assert foreign.files.path(b"f" * 32).exists()                  # another model's stays
    restarted = LLM(d, **kw)                                        # a new engine finds nothing on disk
    assert not restarted.engine.scheduler.offload.disk.lru
    del restarted

    out = llm.generate(asks[1], GREEDY, use_tqdm=False)[0]        # the same prompt again: every tier misses
    assert out.outputs[0].token_ids == expected[1] and out.num_cached_tokens == 0
    after = engine.get_stats()
    for tier in ("cpu", "disk"):
        assert after.kv_tiers[tier].hits == before.kv_tiers[tier].hits
        assert after.kv_tiers[tier].misses == before.kv_tiers[tier].misses + 1
    assert after.num_prompt_tokens - before.num_prompt_tokens == len(asks[1])
    assert_no_leaks(llm)


def test_fp8_disk_blocks_of_another_model_dtype_are_not_read(tiny_model_dirs, tmp_path):
    """kv_cache_dtype fp8: a bfloat16 engine's block files are not hits for a float32 engine on the same
    kv_disk_dir (their KV was computed in bfloat16): the float32 engine answers as it does on its own."""
    d = tiny_model_dirs["llama"]
    prompts = prompts_of([60, 70, 65, 80], seed=5)
    kw = {"kv_cache_dtype": "fp8", "log_stats_interval": 0, "block_size": BS, "num_gpu_blocks_override": 24,
          "kv_offloading_size": gib(1, BLOCK_BYTES // 4), "kv_disk_dir": str(tmp_path)}
    bf16 = LLM(d, dtype="bfloat16", **kw)
    tokens(bf16, prompts)
    assert_no_leaks(bf16)
    assert any(tmp_path.rglob("*.kvb"))
    fp32 = LLM(d, dtype="float32", **kw)
    own = tokens(LLM(d, dtype="float32", **{**kw, "kv_disk_dir": None, "kv_offloading_size": None}), prompts)
    assert tokens(fp32, prompts) == own
    assert fp32.engine.get_stats().kv_tiers["disk"].hits == 0
    assert_no_leaks(fp32)
