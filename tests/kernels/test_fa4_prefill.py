"""FlashAttention-4's Hopper kernel for long prompt rows (fa4_prefill.py), without a GPU: the rows reach its calls
with their lengths (its call replaced by its definition); start-up picks it where it compiles and falls back to
cuDNN where it does not; and its kernels compile for sm_90a under torch's fake tensors where flash-attn-4 is
installed (it is not among the test extras: that test skips). On a GPU, test_cudnn_prefill.py runs its long-row
tests with each kernel."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from kernel_checks import rel_error


def _bottom_right_causal(q, k, v, out, scale):
    """What FA4 computes for one row (as its docs define it), in float32: new token j sees keys 0..S-L+j."""
    num_queries, num_keys, group = q.shape[0], k.shape[0], q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(group, 1).float() for x in (k, v))
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    hidden = torch.arange(num_keys)[None, :] > (num_keys - num_queries + torch.arange(num_queries))[:, None]
    scores.masked_fill_(hidden, float("-inf"))
    out.copy_(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(out.dtype))


def _fake_gathered(q, k, v, out, cu_q, cu_k, scale):
    assert cu_q.tolist() == [0, q.shape[0]] and cu_k.tolist() == [0, k.shape[0]]
    assert q.is_contiguous() and k.is_contiguous() and out.is_contiguous()
    _bottom_right_causal(q, k, v, out, scale)


def test_rows_reach_the_kernel_with_their_lengths(monkeypatch):
    """On the CPU, with FA4's call replaced by its definition: each long row's call gets the row's queries, its
    K/V gathered by slot and cu_seqlens, and its output lands in the row's rows of out: equal to the torch
    oracle's in float32."""
    from attention_cases import make_batch as batch_of

    from pagedllm.attention import cudnn_prefill, fa4_prefill, torch_backend
    monkeypatch.setattr(cudnn_prefill, "KERNEL", "fa4")
    monkeypatch.setattr(cudnn_prefill, "MIN_PAIRS", 0)
    monkeypatch.setattr(fa4_prefill, "attend", _fake_gathered)
    rows = [(700, 700), (3000, 1100), (40, 1), (1500, 1500)]
    batch = batch_of(rows, 4, 2, 16, 16, torch.float32, "cpu", seed=2)
    torch_backend.write_kv(batch.kv_cache, batch.k, batch.v, batch.meta.slot_mapping)
    scale = 0.3
    ref = torch_backend.paged_attention(batch.q, batch.kv_cache, batch.ref_meta, scale)
    out = torch.full_like(batch.q, float("nan"))
    cudnn_prefill.attend(batch.q, out, batch.kv_cache, batch.meta, scale, cudnn_prefill.LONG_QUERY_LEN)
    long = torch.zeros(len(batch.q), dtype=torch.bool)
    long[700 + 0:700 + 1100] = long[700 + 1100 + 1:] = True
    assert out[~long].isnan().all(), "a short row was written"
    assert rel_error(out[long], ref[long]) <= 1e-5


def test_the_kernel_switch():
    from pagedllm.attention import cudnn_prefill
    assert [cudnn_prefill.read_kernel(v) for v in (None, "", "cudnn", "fa4")] == ["auto", "auto", "cudnn", "fa4"]
    for bad in ("fa3", "fa4-paged"):
        with pytest.raises(ValueError, match="PAGEDLLM_LONG_PREFILL must be cudnn or fa4"):
            cudnn_prefill.read_kernel(bad)


@pytest.mark.parametrize("asked,fa4,compiles,chosen", [
    ("auto", True, True, "fa4"), ("auto", True, False, "cudnn"), ("auto", False, None, "cudnn"),
    ("fa4", True, True, "fa4"), ("fa4", False, None, "cudnn"), ("cudnn", True, None, "cudnn")])
def test_start_up_picks_fa4_where_it_compiles(asked, fa4, compiles, chosen, monkeypatch):
    """prebuild_plans settles the kernel: FA4 where it imports and compiles for the heads (unless cudnn was asked
    for), else cuDNN, whose plan it then builds; the rows after go to the one it chose."""
    from pagedllm.attention import cudnn_prefill, fa4_prefill
    built = []

    def fa4_prebuild(*args):
        built.append("fa4")
        if not compiles:
            raise RuntimeError("DSLRuntimeError: unsupported head dim")
    monkeypatch.setattr(cudnn_prefill, "KERNEL", asked)
    monkeypatch.setattr(cudnn_prefill, "ENABLED", True)
    monkeypatch.setattr(cudnn_prefill, "_limits", [0, 0])
    monkeypatch.setattr(cudnn_prefill, "_usable", lambda *a: True)
    monkeypatch.setattr(cudnn_prefill, "_frontend", lambda: object())
    monkeypatch.setattr(cudnn_prefill, "_cudnn", lambda *a: built.append("cudnn"))
    monkeypatch.setattr(fa4_prefill, "interface", lambda: object() if fa4 else None)
    monkeypatch.setattr(fa4_prefill, "prebuild", fa4_prebuild)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    assert cudnn_prefill.prebuild_plans(16, 8, 128, torch.bfloat16, torch.device("meta"), 16384, 32768) == 1
    assert cudnn_prefill.KERNEL == chosen and cudnn_prefill.ENABLED
    assert built == {"fa4": ["fa4"], "cudnn": ["fa4", "cudnn"] if fa4 and asked != "cudnn" else ["cudnn"]}[chosen]


def test_kernels_compile_for_hopper_without_a_gpu():
    """The kernel, for the heads above, compiles for sm_90a on the CPU (fake tensors; FA4 reads the arch
    and SM count from the environment then): a call the kernel cannot take fails here, not on the GPU."""
    pytest.importorskip("flash_attn.cute")
    script = textwrap.dedent("""
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode
        from pagedllm.attention import fa4_prefill
        torch.cuda.synchronize = lambda device=None: None    # nothing runs
        with FakeTensorMode(allow_non_fake_inputs=True):
            for dtype in (torch.bfloat16, torch.float16):
                for hq, hkv, d in ((16, 8, 128), (32, 8, 128), (8, 1, 64)):
                    fa4_prefill.prebuild(hq, hkv, d, dtype, torch.device("cuda"))
        print("compiled")
    """)
    env = dict(os.environ, FLASH_ATTENTION_ARCH="sm_90", CUTE_DSL_ARCH="sm_90a", FLASH_ATTENTION_NUM_SMS="132")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert "compiled" in result.stdout, result.stderr[-3000:]
