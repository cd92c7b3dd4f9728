"""How many KV blocks an engine gets (runner/kv_cache.py determine_num_blocks): on a GPU, what profiling left
free, at most GPU_CAP_FACTOR x what max_num_seqs requests of max_model_len tokens use."""
import re

import pytest

from pagedllm.config import EngineConfig
from pagedllm.runner.kv_cache import GPU_CAP_FACTOR, determine_num_blocks

BLOCK_BYTES = 8192   # a 2-layer test model's block: 2 x 2 layers x 16 tokens x 2 heads x 16 dims x 4 bytes


def test_free_memory_sets_the_count_below_the_cap():
    config = EngineConfig(max_num_seqs=512)   # blocks of 16 tokens: 32 a 512-token request, cap 4 x 512 x 32
    assert determine_num_blocks(config, 512, BLOCK_BYTES, 1000 * BLOCK_BYTES + 5) == 1000


def test_a_small_model_on_a_large_gpu_stops_at_the_cap(caplog):
    config = EngineConfig(max_num_seqs=512)
    free = 125 << 30   # an H200 at 0.9, less the weights: ~16M blocks of 8 KB
    with caplog.at_level("INFO", logger="pagedllm"):
        assert determine_num_blocks(config, 512, BLOCK_BYTES, free) == GPU_CAP_FACTOR * 512 * 32
    assert "max_num_seqs=512" in caplog.text and "max_model_len=512" in caplog.text


def test_the_cap_follows_max_model_len_and_max_num_seqs():
    config = EngineConfig(max_num_seqs=3)
    assert determine_num_blocks(config, 100, BLOCK_BYTES, 1 << 40) == GPU_CAP_FACTOR * 3 * 7   # 100 tokens: 7 blocks


def test_explicit_sizes_are_not_capped():
    assert determine_num_blocks(EngineConfig(num_gpu_blocks_override=10**7, max_num_seqs=1), 16, BLOCK_BYTES) == 10**7
    config = EngineConfig(kv_cache_memory=10**6 * BLOCK_BYTES, max_num_seqs=1)
    assert determine_num_blocks(config, 16, BLOCK_BYTES) == 10**6


def test_too_little_free_memory_for_one_request_names_the_settings():
    with pytest.raises(ValueError, match="gpu_memory_utilization.*max_model_len"):
        determine_num_blocks(EngineConfig(max_num_seqs=8), 4096, BLOCK_BYTES, 100 * BLOCK_BYTES)


@pytest.mark.parametrize("kw, name", [(dict(num_gpu_blocks_override=10**12), "num_gpu_blocks_override"),
                                      (dict(kv_cache_memory=2**60), "kv_cache_memory")])
def test_an_asked_size_past_memory_is_an_error_naming_it(tiny_model_dirs, kw, name):
    """Sizes no profiling checked: past the machine's memory, a ValueError naming the setting when the engine
    starts (was the allocator's error, or on a machine that overcommits, the OOM killer)."""
    from pagedllm import LLM
    with pytest.raises(ValueError, match=f"{name}=.* KV blocks of .* GiB, more than the .* GiB this machine's memory"):
        LLM(tiny_model_dirs["llama"], dtype="float32", log_stats_interval=0, **kw)


@pytest.mark.parametrize("kw, free, words", [
    (dict(kv_cache_memory=10 * BLOCK_BYTES), None, "kv_cache_memory=81920 bytes holds 160 tokens"),
    (dict(), None, "the CPU KV cache (at most 4 GiB unless kv_cache_memory is set) holds"),
])
def test_a_kv_cache_smaller_than_one_full_length_request_is_refused_naming_what_to_change(kw, free, words):
    """As vLLM refuses it at start-up: was an engine that started, then refused every longer request."""
    config = EngineConfig(max_num_seqs=8, **kw)
    huge_block = BLOCK_BYTES if kw else 1 << 30   # a block of 1 GiB: 4 blocks (64 tokens) under the CPU cap
    with pytest.raises(ValueError, match=re.escape(words) + ".*lower max_model_len"):
        determine_num_blocks(config, 4096, huge_block, free)


def test_a_kv_cache_that_holds_one_full_length_request_is_enough():
    config = EngineConfig(max_num_seqs=8, kv_cache_memory=256 * BLOCK_BYTES)
    assert determine_num_blocks(config, 4096, BLOCK_BYTES) == 256
