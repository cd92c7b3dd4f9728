"""The cuDNN long-prefill path (padded, split into fixed-shape calls, merged) on Hopper against the torch oracle
and the Triton kernel, on fresh random long rows; and the plans pre-built at start-up serving later rows."""
import time

import pytest
import torch
from attention_cases import check_attention, make_batch
from kernel_checks import rel_error

from pagedllm.attention.cudnn_shapes import RowSplit

pytestmark = pytest.mark.gpu

LONG_ROWS = {   # (seq_len, query_len)
    "fresh 8k": [(8192, 8192)],
    "fresh odd 5000 + chunk 1024 after 4095": [(5000, 5000), (5119, 1024)],
    "chunk 3000 after 9000 + 2500 after 9193": [(12000, 3000), (11693, 2500)],   # two parts, lead 808 / 1001
    "chunk 2001 after 13001": [(15002, 2001)],                                      # three parts: the fp32 fold
    "chunk 16384 after 8192 + 1500 after 20000": [(24576, 16384), (21500, 1500)],
    "W4 tail 2768 after 27232 + fresh 2000": [(30000, 2768), (2000, 2000)],
}


@pytest.fixture
def cudnn(monkeypatch):
    """The path on, and the shapes of its calls."""
    from pagedllm.attention import cudnn_prefill
    if not cudnn_prefill._cudnn_on_hopper(torch.device("cuda")):
        pytest.skip("the cuDNN prefill path runs on sm_90 only")
    monkeypatch.setattr(cudnn_prefill, "ENABLED", True)
    monkeypatch.setattr(cudnn_prefill, "MIN_PAIRS", 0)   # every row of LONG_QUERY_LEN+ new tokens goes
    calls, real = [], cudnn_prefill._cudnn

    def spy(q, k, v, scale, causal):
        calls.append((causal, q.shape[0], k.shape[0]))
        return real(q, k, v, scale, causal)
    monkeypatch.setattr(cudnn_prefill, "_cudnn", spy)
    return cudnn_prefill, calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("heads,head_dim", [((16, 8), 128), ((32, 8), 128), ((8, 1), 64)], ids=str)
@pytest.mark.parametrize("case", list(LONG_ROWS))
def test_long_rows_match_torch_and_triton(cudnn, case, dtype, heads, head_dim):
    cudnn_prefill, calls = cudnn
    from pagedllm.attention import triton_backend
    rows = LONG_ROWS[case] + [(700, 700), (3000, 1), (0, 1)]      # short rows stay on the Triton kernels
    batch = make_batch(rows, *heads, head_dim, 16, dtype, "cuda", seed=3)
    check_attention(batch, triton_backend)
    want = [s for seq, n in rows if n >= cudnn_prefill.LONG_QUERY_LEN for s in RowSplit(n, seq - n).shapes()]
    assert calls == want
    scale = head_dim ** -0.5
    ours = triton_backend.paged_attention(batch.q, batch.kv_cache, batch.meta, scale)
    cudnn_prefill.ENABLED = False
    triton_only = triton_backend.paged_attention(batch.q, batch.kv_cache, batch.meta, scale)
    real = ~batch.padding
    assert rel_error(ours[real], triton_only[real]) <= 1e-2


@pytest.mark.parametrize("case", ["fresh odd 5000 + chunk 1024 after 4095", "chunk 2001 after 13001",
                                  "W4 tail 2768 after 27232 + fresh 2000"])
def test_fp8_cache_rows(cudnn, case):
    """An fp8 cache with scales other than 1: the rows' K/V are widened after the gather, k_scale goes into
    cuDNN's scale and v_scale into the merge (one, two and three parts), against the torch oracle."""
    from fp8_kv_cases import fp8_batch

    from pagedllm.attention import triton_backend
    cudnn_prefill, calls = cudnn
    rows = LONG_ROWS[case] + [(700, 700), (3000, 1)]
    batch = fp8_batch(rows, 16, 8, 128, 16, torch.bfloat16, "cuda", (0.43, 2.7), seed=4)
    check_attention(batch, triton_backend, kv_scales=(0.43, 2.7))
    assert calls == [s for seq, n in rows if n >= cudnn_prefill.LONG_QUERY_LEN for s in RowSplit(n, seq - n).shapes()]


@pytest.mark.parametrize("num_parts", [2, 3, 5])
def test_merge_kernel_matches_torch_merge(cudnn, num_parts):
    """The Triton merge (CUDA: one kernel a part after the first) against the fp32 torch fold the CPU uses."""
    cudnn_prefill, _ = cudnn
    gen = torch.Generator(device="cuda").manual_seed(num_parts)
    tokens, heads, dim = 3000, 16, 128
    parts = [(torch.randn(tokens, heads, dim, device="cuda", generator=gen).bfloat16(),
              torch.randn(heads, tokens + 9, device="cuda", generator=gen)[:, 9:] * 4) for _ in range(num_parts)]
    a, b = (torch.empty(tokens, heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for v_scale in (1.0, 2.7):
        cudnn_prefill._merge(a, parts, v_scale)
        cudnn_prefill._merge_torch(b, parts, v_scale)
        assert rel_error(a, b) <= 4e-3


def test_prebuilt_plans_serve_new_rows(cudnn):
    """After prebuild_plans for W4's limits, rows of lengths never seen call no shape outside the set and none
    of them pays a plan build (55-70 ms each on the H200)."""
    cudnn_prefill, calls = cudnn
    from pagedllm.attention import triton_backend
    n = cudnn_prefill.prebuild_plans(16, 8, 128, torch.bfloat16, torch.device("cuda"), 16384, 32768)
    assert n == 52
    from pagedllm.attention.cudnn_shapes import reachable_shapes
    prebuilt = reachable_shapes(cudnn_prefill.LONG_QUERY_LEN, 16384, 32768)
    for rows in ([(3000, 1100)], [(13331, 6001)], [(29999, 15001)], [(4409, 4409)]):   # the first compiles Triton
        batch = make_batch(rows, 16, 8, 128, 16, torch.bfloat16, "cuda", seed=1)
        torch.cuda.synchronize()
        start = time.perf_counter()
        triton_backend.paged_attention(batch.q, batch.kv_cache, batch.meta, 128 ** -0.5)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - start) * 1e3
        assert set(calls) <= prebuilt
        assert ms < 40 or rows == [(3000, 1100)], f"{rows}: {ms:.0f} ms (a plan built?)"
