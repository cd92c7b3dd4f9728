"""triton_backend against torch_backend: on CUDA (fresh random batches of every kind), and on CPU through
the Triton interpreter in a subprocess (TRITON_INTERPRET is read when the kernels are decorated)."""
import random

import pytest
import torch
from attention_cases import (
    check_attention,
    check_graph_padding,
    check_graph_replay_equals_eager,
    check_row_independent_of_batch,
    check_shared_prefix,
    check_write_kv,
    make_batch,
    random_rows,
    shared_prefix_rows,
)
from kernel_checks import run_under_interpreter_side_by_side

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HEADS = [(16, 8), (32, 8), (8, 8), (12, 4), (8, 1)]    # Qwen3-0.6B, Llama-3.1-8B, MHA, group 3, MQA


def test_kernels_under_triton_interpreter():
    pytest.importorskip("triton")
    stdout = run_under_interpreter_side_by_side("attention_cases.py", 600, [["0", "1"], ["2", "3"]])
    assert stdout.count("ok ") == 4, stdout


def _triton():
    from pagedllm.attention import triton_backend
    return triton_backend


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", HEADS, ids=str)
@pytest.mark.parametrize("head_dim,block_size", [(128, 16), (64, 32), (128, 64), (80, 16)])
def test_mixed_batch_matches_torch(dtype, heads, head_dim, block_size):
    rng = random.Random(hash((str(dtype), heads, head_dim, block_size)) & 0xFFFF)
    rows = random_rows(rng, 24, max_context=700, max_query=150)
    rows += [(1, 1), (0, 1), (2500, 1), (300, 300), (1200, 100)]   # each kind at least once
    rng.shuffle(rows)
    batch = make_batch(rows, *heads, head_dim, block_size, dtype, "cuda", seed=rng.randrange(1 << 16))
    check_write_kv(batch, _triton())
    check_attention(batch, _triton())
    check_graph_padding(batch, _triton())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", [(16, 8), (32, 8), (8, 1)], ids=str)
@pytest.mark.parametrize("head_dim", [128, 64])
def test_shared_prefix_segments(dtype, heads, head_dim):
    """Groups of decode rows behind 2,000-token prefixes (W3's shape), beside rows of every other kind."""
    rows, shared = shared_prefix_rows(random.Random(11), 2000, groups=3, per_group=21, block_size=16)
    batch = make_batch(rows, *heads, head_dim, 16, dtype, "cuda", seed=11, shared=shared)
    check_shared_prefix(batch, _triton(), 16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_long_decode_rows_split_kv(dtype):
    """Few rows, long contexts: many segments, and rows longer than PARTITION * MAX_SEGMENTS."""
    rows = [(33000, 1), (16385, 1), (513, 1), (0, 1), (70000, 1)]
    batch = make_batch(rows, 16, 8, 128, 16, dtype, "cuda", seed=5)
    check_attention(batch, _triton())
    check_row_independent_of_batch(batch, _triton(), row=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_large_prefill_chunk(dtype):
    rows = [(2048, 2048), (2100, 100), (4000, 1900), (1024, 1024), (600, 1), (2500, 2500)]
    batch = make_batch(rows, 32, 8, 128, 16, dtype, "cuda", seed=6)
    check_attention(batch, _triton())


@pytest.mark.gpu
def test_decode_row_does_not_depend_on_batch():
    rng = random.Random(7)
    rows = random_rows(rng, 200, max_context=3000, max_query=1, kinds=("decode", "padding"))
    rows[0] = (1900, 1)
    batch = make_batch(rows, 16, 8, 128, 16, torch.bfloat16, "cuda", seed=7)
    check_row_independent_of_batch(batch, _triton(), row=0)


@pytest.mark.gpu
@pytest.mark.parametrize("num_rows", [1, 4, 64, 256])
def test_cuda_graph_replay_is_bit_identical_to_eager(num_rows):
    check_graph_replay_equals_eager(_triton(), num_rows, max_context=2000)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("heads", [(16, 8), (32, 8), (8, 1)], ids=str)
@pytest.mark.parametrize("head_dim,block_size", [(128, 16), (64, 32)])
def test_long_prompt_rows_through_cudnn(dtype, heads, head_dim, block_size, monkeypatch):
    """Rows of LONG_QUERY_LEN+ new tokens go to cuDNN on Hopper: fresh prompts, chunks after cached context,
    odd lengths, beside rows the Triton kernels keep (shorter chunks, decode, padding)."""
    from pagedllm.attention import cudnn_prefill
    if not cudnn_prefill._sm90(torch.device("cuda")) or cudnn_prefill._frontend() is None:
        pytest.skip("the cuDNN prefill path runs on sm_90 only")
    monkeypatch.setattr(cudnn_prefill, "KERNEL", "cudnn")
    monkeypatch.setattr(cudnn_prefill, "ENABLED", True)
    monkeypatch.setattr(cudnn_prefill, "MIN_PAIRS", 0)
    calls = []
    real = cudnn_prefill._cudnn
    monkeypatch.setattr(cudnn_prefill, "_cudnn", lambda q, k, *a: calls.append((q.shape[0], k.shape[0])) or
                        real(q, k, *a))
    long = cudnn_prefill.LONG_QUERY_LEN
    rows = [(long + 5, long + 5), (5003, long), (9000, 2 * long + 77), (300, 300), (2500, 1), (1200, 100), (0, 1)]
    batch = make_batch(rows, *heads, head_dim, block_size, dtype, "cuda", seed=7)
    check_attention(batch, _triton())
    assert sorted(calls) == sorted((n, s) for s, n in rows if n >= long)     # one call a long row
