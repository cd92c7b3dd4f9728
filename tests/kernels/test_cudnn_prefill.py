"""The long-prefill path (one bottom-right causal call a row) on Hopper against the torch oracle and the Triton
kernel, on fresh random long rows, with each of its kernels: cuDNN through its graph API, and FlashAttention-4's
Hopper kernel where flash-attn-4 is installed (test_fa4_prefill.py has its CPU tests); and cuDNN's plan built at
start-up serving rows of every length after it, with no other plan built."""
import time

import pytest
import torch
from attention_cases import check_attention, make_batch
from kernel_checks import rel_error

pytestmark = pytest.mark.gpu

LONG_ROWS = {   # (seq_len, query_len)
    "fresh 8k": [(8192, 8192)],
    "fresh odd 5000 + chunk 1024 after 4095": [(5000, 5000), (5119, 1024)],
    "chunk 3000 after 9000 + 2500 after 9193": [(12000, 3000), (11693, 2500)],
    "chunk 2001 after 13001": [(15002, 2001)],
    # (not 16384 after 8192: the oracle's float32 scores for 32 heads take 48 GiB, too many for an H100)
    "chunk 8192 after 8192 + 1500 after 20000": [(16384, 8192), (21500, 1500)],
    "W4 tail 2768 after 27232 + fresh 2000": [(30000, 2768), (2000, 2000)],
}


@pytest.fixture(params=["cudnn", "fa4"])
def cudnn(request, monkeypatch):
    """The path on with request.param's kernel, and the (queries, keys) of its calls."""
    from pagedllm.attention import cudnn_prefill, fa4_prefill
    monkeypatch.setattr(cudnn_prefill, "KERNEL", request.param)
    library = cudnn_prefill._frontend() if request.param == "cudnn" else fa4_prefill.interface()
    if not cudnn_prefill._sm90(torch.device("cuda")) or library is None:
        pytest.skip(f"the long-prefill path with {request.param} runs on sm_90 with its library only "
                    "(nvidia-cudnn-frontend, flash-attn-4)")
    monkeypatch.setattr(cudnn_prefill, "ENABLED", True)
    monkeypatch.setattr(cudnn_prefill, "MIN_PAIRS", 0)   # every row of LONG_QUERY_LEN+ new tokens goes
    calls = []

    def spy(module, name, keys):   # keys(args): the call's number of keys
        real = getattr(module, name)

        def call(*args):
            calls.append((args[0].shape[0], keys(args)))
            return real(*args)
        monkeypatch.setattr(module, name, call)
    spy(cudnn_prefill, "_cudnn", lambda a: a[1].shape[0])                          # (q, k, v, out, lens, scale)
    spy(fa4_prefill, "attend", lambda a: a[1].shape[0])                            # (q, k, v, out, cu_q, ...)
    return cudnn_prefill, calls


def long_calls(rows, cudnn_prefill):
    return [(n, seq) for seq, n in rows if n >= cudnn_prefill.LONG_QUERY_LEN]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("heads,head_dim", [((16, 8), 128), ((32, 8), 128), ((8, 1), 64)], ids=str)
@pytest.mark.parametrize("case", list(LONG_ROWS))
def test_long_rows_match_torch_and_triton(cudnn, case, dtype, heads, head_dim):
    cudnn_prefill, calls = cudnn
    from pagedllm.attention import triton_backend
    rows = LONG_ROWS[case] + [(700, 700), (3000, 1), (0, 1)]      # short rows stay on the Triton kernels
    batch = make_batch(rows, *heads, head_dim, 16, dtype, "cuda", seed=3)
    check_attention(batch, triton_backend)
    assert sorted(calls) == sorted(long_calls(rows, cudnn_prefill))
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
    cuDNN's scale (a plan of its own) and v_scale onto the rows' output, against the torch oracle."""
    from fp8_kv_cases import fp8_batch

    from pagedllm.attention import triton_backend
    cudnn_prefill, calls = cudnn
    rows = LONG_ROWS[case] + [(700, 700), (3000, 1)]
    batch = fp8_batch(rows, 16, 8, 128, 16, torch.bfloat16, "cuda", (0.43, 2.7), seed=4)
    check_attention(batch, triton_backend, kv_scales=(0.43, 2.7))
    assert sorted(calls) == sorted(long_calls(rows, cudnn_prefill))


def test_rows_write_only_their_own_output(cudnn):
    """Packed rows: each call writes its row's out rows and no other (out's other rows keep what the Triton
    kernels wrote), with the long row first, in the middle and last of the step."""
    cudnn_prefill, calls = cudnn
    from pagedllm.attention import triton_backend
    for rows in ([(3000, 3000), (500, 1), (800, 800)], [(500, 1), (4100, 2100), (900, 900)],
                 [(600, 600), (70, 1), (2100, 2100)]):
        batch = make_batch(rows, 16, 8, 128, 16, torch.bfloat16, "cuda", seed=5)
        check_attention(batch, triton_backend)
    assert len(calls) == 3


def test_prebuilt_plan_serves_new_rows(cudnn, monkeypatch):
    """After prebuild_plans for W4's limits (one plan), rows of lengths never seen build no other plan and pay
    no build (0.04-0.7 s each on the H200)."""
    cudnn_prefill, calls = cudnn
    if cudnn_prefill.KERNEL != "cudnn":
        pytest.skip("cuDNN's plans only")
    from pagedllm.attention import triton_backend
    monkeypatch.setattr(cudnn_prefill, "_limits", [0, 0])   # prebuild_plans sets this list; the others' back after
    assert cudnn_prefill.prebuild_plans(16, 8, 128, torch.bfloat16, torch.device("cuda"), 16384, 32768) == 1
    built = cudnn_prefill._plan.cache_info().currsize
    for rows in ([(3000, 1100)], [(13331, 6001)], [(29999, 15001)], [(4409, 4409)]):   # the first: Triton
        batch = make_batch(rows, 16, 8, 128, 16, torch.bfloat16, "cuda", seed=1)
        torch.cuda.synchronize()
        start = time.perf_counter()
        triton_backend.paged_attention(batch.q, batch.kv_cache, batch.meta, 128 ** -0.5)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - start) * 1e3
        assert cudnn_prefill._plan.cache_info().currsize == built
        assert ms < 40 or rows == [(3000, 1100)], f"{rows}: {ms:.0f} ms (a plan built?)"
    assert len(calls) == 5     # prebuild's own call, then one a row
