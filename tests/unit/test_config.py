"""EngineConfig's batch defaults follow vLLM's: larger batches on big GPUs, a smaller step budget when serving."""
import pytest

from pagedllm.config import EngineConfig


@pytest.mark.parametrize("large_gpu, serving, expected", [
    (True, False, (512, 16384)),    # H100/H200, offline LLM
    (True, True, (512, 8192)),      # H100/H200, serving
    (False, False, (256, 8192)),     # CPU, A100, smaller GPUs
    (False, True, (256, 8192)),
])
def test_batch_defaults(large_gpu, serving, expected):
    config = EngineConfig().with_batch_defaults(large_gpu, serving)
    assert (config.max_num_seqs, config.max_num_batched_tokens) == expected


def test_explicit_batch_sizes_are_kept():
    config = EngineConfig(max_num_seqs=7, max_num_batched_tokens=99).with_batch_defaults(True, False)
    assert (config.max_num_seqs, config.max_num_batched_tokens) == (7, 99)


def test_bad_batch_sizes_name_the_field():
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        EngineConfig(max_num_batched_tokens=-1)
