"""Sliding-window attention and attention-logit soft-capping in triton_backend (window_cases.py), against a
dense reference: on CPU through the Triton interpreter in a subprocess, and on CUDA at model sizes."""
import random

import pytest
import torch
from attention_cases import check_graph_replay_equals_eager, make_batch, random_rows, shared_prefix_rows
from kernel_checks import run_under_interpreter_side_by_side
from window_cases import CASES, as_fp8, check_windowed, check_windowed_decode_qkv, check_windowed_shared

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HEADS = [(16, 8), (32, 8), (8, 1)]      # Qwen3-0.6B, Llama-3.1-8B, MQA
# (window, soft cap): Gemma 2's 4,096 and 50, windows not a multiple of a block or a tile, a cap alone
LAYERS = [(4096, 50.0), (1000, None), (None, 30.0), (333, 30.0), (37, None)]


def test_window_and_soft_cap_under_triton_interpreter():
    pytest.importorskip("triton")
    half = (len(CASES) + 1) // 2
    stdout = run_under_interpreter_side_by_side(
        "window_cases.py", 600, [[str(i) for i in range(half)], [str(i) for i in range(half, len(CASES))]])
    assert stdout.count("ok ") == len(CASES), stdout


def _triton():
    from pagedllm.attention import triton_backend
    return triton_backend


def _rows(rng: random.Random, window: int | None) -> list[tuple[int, int]]:
    """Random rows of every kind plus, for the window: decode rows shorter and longer than it, chunks after
    context longer than it, a fresh prompt longer than it, a row of many segments, padding."""
    w = window or 1000
    rows = random_rows(rng, 24, max_context=3000, max_query=200)
    rows += [(1, 1), (0, 1), (9000, 1), (w // 2 + 1, 1), (w + 700, 300), (w + 2500, 64), (w + 170, w + 170),
             (w + 3, 1)]
    rng.shuffle(rows)
    return rows


@pytest.mark.gpu
@pytest.mark.parametrize("window,soft_cap", LAYERS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", HEADS, ids=str)
@pytest.mark.parametrize("head_dim,block_size", [(128, 16), (64, 32)])
def test_mixed_batch_matches_reference(window, soft_cap, dtype, heads, head_dim, block_size):
    """Decode (split-KV), fresh prefill, chunks after cached context, padding; a small decode-only step;
    graph padding bit-identical, decode rows independent of their batch."""
    rng = random.Random(hash((window, soft_cap, str(dtype), heads, head_dim, block_size)) & 0xFFFF)
    batch = make_batch(_rows(rng, window), *heads, head_dim, block_size, dtype, "cuda", seed=rng.randrange(1 << 16))
    check_windowed(batch, _triton(), window, soft_cap)
    small = [(9000, 1), (1, 1), (0, 1), ((window or 1000) + 9, 1), (1500, 1)]
    check_windowed(make_batch(small, *heads, head_dim, block_size, dtype, "cuda", seed=1), _triton(), window, soft_cap)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [4096, 20000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_long_decode_rows(window, dtype):
    """Rows far longer than the window, and windows longer than PARTITION * MAX_SEGMENTS (longer segments)."""
    rows = [(33000, 1), (16385, 1), (513, 1), (0, 1), (70000, 1), (window + 1, 1)]
    check_windowed(make_batch(rows, 16, 8, 128, 16, dtype, "cuda", seed=5), _triton(), window, 50.0)


@pytest.mark.gpu
@pytest.mark.parametrize("window,soft_cap", [(700, None), (None, 50.0), (1500, 30.0)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", HEADS, ids=str)
@pytest.mark.parametrize("head_dim", [128, 64])
def test_shared_prefix_plan(window, soft_cap, dtype, heads, head_dim):
    """A step with shared segments planned (W3's shape): a windowed layer reads its rows' windows alone, a capped
    one reads the shared segments."""
    rows, shared = shared_prefix_rows(random.Random(11), 2000, groups=3, per_group=21, block_size=16)
    batch = make_batch(rows, *heads, head_dim, 16, dtype, "cuda", seed=11, shared=shared)
    check_windowed_shared(batch, _triton(), window, soft_cap)


@pytest.mark.gpu
@pytest.mark.parametrize("window,soft_cap", [(4096, 50.0), (333, 30.0), (None, 30.0)], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("heads,head_dim", [((16, 8), 128), ((14, 2), 64), ((8, 1), 128)], ids=str)
@pytest.mark.parametrize("num_rows", [1, 6])
@pytest.mark.parametrize("gemma", [False, True], ids=["llama_norm", "gemma_norm"])   # Gemma 3: all three together
def test_decode_qkv(window, soft_cap, dtype, heads, head_dim, num_rows, gemma):
    rng = random.Random(num_rows * 1000 + head_dim + heads[0])
    rows = [(rng.randint(2, 9000), 1) for _ in range(num_rows - 1)] + [(0, 1) if num_rows > 1 else (7000, 1)]
    check_windowed_decode_qkv(rows, *heads, head_dim, 16, dtype, "cuda", window, soft_cap, seed=num_rows,
                              gemma=gemma)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_scales", [(1.0, 1.0), (0.43, 2.7)], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("window,soft_cap", [(4096, 50.0), (333, None), (None, 30.0)], ids=str)
def test_fp8_kv_cache(kv_scales, dtype, window, soft_cap):
    """An fp8 cache: k_scale folded into the scores before the cap, v_scale on the output."""
    rng = random.Random(hash((kv_scales, str(dtype), window, soft_cap)) & 0xFFFF)
    batch = as_fp8(make_batch(_rows(rng, window), 16, 8, 128, 16, dtype, "cuda", seed=3), kv_scales)
    check_windowed(batch, _triton(), window, soft_cap, kv_scales)


@pytest.mark.gpu
@pytest.mark.parametrize("window,soft_cap", [(4096, None), (None, 50.0)], ids=str)
def test_long_prompt_rows_stay_on_triton(window, soft_cap, monkeypatch):
    """Rows of LONG_QUERY_LEN+ new tokens, which cuDNN / FA4 would take on Hopper: a windowed or capped layer keeps
    them on the Triton kernel (those calls take neither), and gets them right."""
    from pagedllm.attention import cudnn_prefill
    monkeypatch.setattr(cudnn_prefill, "ENABLED", True)
    monkeypatch.setattr(cudnn_prefill, "MIN_PAIRS", 0)
    calls = []
    monkeypatch.setattr(cudnn_prefill, "attend", lambda *a, **k: calls.append(a))
    long = cudnn_prefill.LONG_QUERY_LEN
    rows = [(long + 5, long + 5), (9000, 2 * long + 77), (6000, long), (300, 300), (2500, 1), (0, 1)]
    batch = make_batch(rows, 32, 8, 128, 16, torch.bfloat16, "cuda", seed=7)
    if cudnn_prefill.threshold(batch.q, batch.meta) == cudnn_prefill.NEVER:
        pytest.skip("no long-prompt path on this machine (Hopper with cuDNN's frontend or FA4)")
    check_windowed(batch, _triton(), window, soft_cap)
    assert not calls


@pytest.mark.gpu
@pytest.mark.parametrize("window,soft_cap", [(700, 30.0), (4096, None)], ids=str)
@pytest.mark.parametrize("num_rows", [1, 64])
def test_cuda_graph_replay_is_bit_identical_to_eager(window, soft_cap, num_rows):
    """The window sizes the scratch: it must not change a row's segments (graph replay equals eager)."""
    check_graph_replay_equals_eager(_triton(), num_rows, max_context=6000, sliding_window=window, soft_cap=soft_cap)
