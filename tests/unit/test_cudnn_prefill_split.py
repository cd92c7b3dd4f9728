"""cudnn_prefill's padding and split of long rows into fixed-shape calls, on CPU: `_cudnn` is replaced by a plain
torch attention with cuDNN's semantics (top-left causal mask, natural-log LSE), and attend() is compared with
torch_backend (the oracle: one masked softmax over the whole row, no split)."""
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pagedllm.attention import cudnn_prefill, cudnn_shapes, torch_backend
from pagedllm.attention.cudnn_shapes import RowSplit, chunked_rows, reachable_shapes
from pagedllm.attention.metadata import AttentionMetadata


def fake_cudnn(calls):
    def run(q, k, v, scale, causal):
        """q (L, Hq, D), k v (S, Hkv, D) -> out (L, Hq, D), lse (Hq, L); query i sees keys 0..i if causal."""
        assert q.stride(0) == q.shape[1] * q.shape[2] and k.stride(0) == k.shape[1] * k.shape[2]
        calls.append((causal, q.shape[0], k.shape[0]))
        group = q.shape[1] // k.shape[1]
        kf, vf = (x.double().repeat_interleave(group, dim=1).transpose(0, 1) for x in (k, v))   # (Hq, S, D)
        scores = q.double().transpose(0, 1) @ kf.transpose(1, 2) * scale                     # (Hq, L, S)
        if causal:
            scores = scores.masked_fill(torch.ones(q.shape[0], k.shape[0]).triu(1).bool(), float("-inf"))
        out = (scores.softmax(-1) @ vf).transpose(0, 1).to(q.dtype)
        return out, scores.logsumexp(-1).float()
    return run


def batch(rows, hq, hkv, head_dim, dtype, block_size=8, seed=0):
    """rows (seq_len, query_len): random cache (blocks shuffled), q, and the step's metadata; table entries past
    a row's blocks point far outside the cache, so a read past its tokens fails."""
    gen = torch.Generator().manual_seed(seed)
    per_row = [-(-s // block_size) for s, _ in rows]
    order = torch.randperm(sum(per_row) + 2, generator=gen)
    tables = torch.full((len(rows), max(per_row) + 1), 1 << 28, dtype=torch.int32)
    used = 0
    for i, n in enumerate(per_row):
        tables[i, :n] = order[used:used + n]
        used += n
    cache = torch.randn(2, len(order), block_size, hkv, head_dim, generator=gen).to(dtype)
    starts = [0]
    for _, q_len in rows:
        starts.append(starts[-1] + q_len)
    q = torch.randn(starts[-1], hq, head_dim, generator=gen).to(dtype)
    seq_lens = [s for s, _ in rows]
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(starts[-1], dtype=torch.int64), query_start_loc=torch.tensor(starts),
        seq_lens=torch.tensor(seq_lens), block_tables=tables, max_query_len=max(q for _, q in rows),
        max_seq_len=max(seq_lens), query_start_loc_cpu=starts, seq_lens_cpu=seq_lens)
    return q, cache, meta


def check(rows, hq, hkv, head_dim, dtype, long_query_len, monkeypatch, tol):
    calls = []
    monkeypatch.setattr(cudnn_prefill, "_cudnn", fake_cudnn(calls))
    q, cache, meta = batch(rows, hq, hkv, head_dim, dtype)
    scale = head_dim ** -0.5
    want = []
    # Two layers of one step (the second reuses the rows' plans built at the first): each its own K/V.
    for layer, kv in enumerate((cache, torch.randn(cache.shape, generator=torch.Generator().manual_seed(9))
                                .to(dtype))):
        ref = torch_backend.paged_attention(q, kv, meta, scale)
        out = torch.full_like(q, float("nan"))
        cudnn_prefill.attend(q, out, kv, meta, scale, long_query_len)
        for i, (seq_len, query_len) in enumerate(rows):
            rs = slice(meta.query_start_loc_cpu[i], meta.query_start_loc_cpu[i + 1])
            if query_len < long_query_len:
                assert out[rs].isnan().all(), "a short row was written (the Triton kernel owns it)"
                continue
            want += RowSplit(query_len, seq_len - query_len).shapes()
            err = ((out[rs].double() - ref[rs].double()).norm() / ref[rs].double().norm()).item()
            assert err <= tol, f"layer {layer} row {i} ({seq_len}, {query_len}): relative error {err:.1e}"
    assert calls == want


@pytest.fixture
def small_sizes(monkeypatch):
    """The real decomposition at 1/64 scale (granule 16, pieces 128 and 64), so that rows stay small."""
    monkeypatch.setattr(cudnn_shapes, "GRANULE", 16)
    monkeypatch.setattr(cudnn_shapes, "PIECES", (128, 64))
    monkeypatch.setattr(cudnn_shapes, "UNIT", 64)


@pytest.mark.parametrize("hq,hkv,head_dim", [(4, 2, 64), (4, 4, 128), (6, 2, 64), (3, 1, 128)])
def test_rows_of_every_kind_match_the_oracle(small_sizes, monkeypatch, hq, hkv, head_dim):
    rows = [(40, 40),          # fresh prompt, L not a multiple of the granule
            (64, 64),          # fresh, exact multiple
            (64 + 32, 32),     # context a multiple of UNIT: no lead rows
            (77 + 20, 20),     # context not a multiple of the granule, L not either
            (128 + 16, 16),    # one full piece, L = granule
            (450 + 70, 70),    # pieces 128 x 3 + 64 + lead 2; L not a multiple
            (333 + 150, 150),  # several pieces, L > several granules
            (50, 15), (30, 1)]  # below the threshold: left alone
    random.Random(hq * head_dim).shuffle(rows)
    check(rows, hq, hkv, head_dim, torch.float32, 16, monkeypatch, tol=1e-5)


def test_half_precision_rows(small_sizes, monkeypatch):
    check([(300 + 40, 40), (120, 120)], 4, 2, 64, torch.bfloat16, 16, monkeypatch, tol=1e-2)


def test_real_sizes_chunk_after_long_context(monkeypatch):
    """The shipped constants: 3000 new tokens after 9000 cached (a piece of 8192, a lead of 808), and a fresh
    1100-token prompt; tiny heads keep it quick."""
    check([(12000, 3000), (1100, 1100)], 2, 1, 64, torch.float32, 1024, monkeypatch, tol=1e-5)


def test_split_covers_the_context_once():
    for query_len, context in [(1, 0), (1024, 0), (5000, 4095), (16384, 8192), (3000, 29000), (1500, 130000)]:
        s = RowSplit(query_len, context)
        ends = [0] + [first + n for first, n in s.pieces]
        assert all(first == end for (first, _), end in zip(s.pieces, ends)) and ends[-1] == s.context_big
        assert s.context_big + s.lead == context and 0 <= s.lead < cudnn_shapes.UNIT
        assert s.square % cudnn_shapes.GRANULE == 0 and s.lead + query_len <= s.square < s.lead + query_len + 1024
        assert s.query_rows >= s.lead + s.padded_query_len


@pytest.mark.parametrize("out_len", [1, 256])
def test_w4_chunks_need_few_shapes(out_len):
    """W4's chunks at exact shapes would need a plan for nearly every row; split, a few dozen, every one of
    them among those pre-built for its limits (budget 16384, max_model_len 32768)."""
    rows = [(n, c) for n, c in chunked_rows(output_len=out_len) if n >= cudnn_prefill.LONG_QUERY_LEN]
    exact = {(n, c) for n, c in rows}
    split = {shape for n, c in rows for shape in RowSplit(n, c).shapes()}
    calls = sum(len(RowSplit(n, c).shapes()) for n, c in rows)
    prebuilt = reachable_shapes(cudnn_prefill.LONG_QUERY_LEN, 16384, 32768)
    assert len(exact) > 80 and len(split) <= 32, (len(exact), len(split))
    assert split <= prebuilt and len(prebuilt) == 52
    assert calls <= 2.2 * len(rows)


def test_reachable_shapes_are_reached():
    """Every pre-built shape is one that some row within the limits produces (no plan built for nothing)."""
    budget, max_model_len = 4096, 12288
    seen = set()
    for query_len in range(1024, budget + 1, 37):
        for context in range(0, max_model_len - query_len + 1, 53):
            seen.update(RowSplit(query_len, context).shapes())
    assert seen == reachable_shapes(1024, budget, max_model_len)


def test_step_threshold_needs_enough_pairs():
    """Rows go to cuDNN from the shortest one of LONG_QUERY_LEN+ new tokens and MIN_PAIRS+ (query, key) pairs."""
    def meta(rows):   # (new tokens, seq_len) per row
        starts = [0]
        for n, _ in rows:
            starts.append(starts[-1] + n)
        return AttentionMetadata(None, None, None, None, max(n for n, _ in rows), max(s for _, s in rows),
                                 starts, [s for _, s in rows])
    long, pairs = cudnn_prefill.LONG_QUERY_LEN, cudnn_prefill.MIN_PAIRS
    never = cudnn_prefill.NEVER
    assert cudnn_prefill._step_threshold(meta([(2048, 2048), (1, 900)])) == never     # W1-W3's rows: Triton
    assert cudnn_prefill._step_threshold(meta([(4096, 4096)])) == never               # 16M pairs
    assert cudnn_prefill._step_threshold(meta([(8192, 8192), (1, 50)])) == 8192
    assert cudnn_prefill._step_threshold(meta([(long, pairs // long), (9000, 9000)])) == long
    assert cudnn_prefill._step_threshold(meta([(long - 1, 10 ** 6), (300, 300)])) == never


def test_switch():
    assert cudnn_prefill.read_switch("1") and not cudnn_prefill.read_switch("0")
    assert cudnn_prefill.read_switch(None) == cudnn_prefill.DEFAULT_ON == cudnn_prefill.read_switch("")
    with pytest.raises(ValueError, match="PAGEDLLM_CUDNN_PREFILL"):
        cudnn_prefill.read_switch("yes")


MERGE_SCRIPT = """
import torch
from pagedllm.attention import cudnn_prefill
gen = torch.Generator().manual_seed(0)
parts = [(torch.randn(40, 3, 64, generator=gen), torch.randn(3, 41, generator=gen)[:, 1:] * 4) for _ in range(2)]
a, b = torch.empty(40, 3, 64), torch.empty(40, 3, 64)
cudnn_prefill._merge_two(a, *parts[0], *parts[1])
cudnn_prefill._merge_torch(b, parts)
print("ERR", ((a - b).norm() / b.norm()).item())
"""


def test_two_part_merge_kernel_matches_the_fold():
    """The CUDA path's two-part Triton merge (under the interpreter) against the torch fold, an LSE view not
    starting at its storage's first element as the square's is."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-c", MERGE_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout.split("ERR")[1]) < 1e-6, proc.stdout


def test_prebuild_off_or_refused(monkeypatch):
    """No plan on CPU; on a device where cuDNN refuses a shape at start-up the path turns off (Triton keeps the
    rows) instead of failing the engine."""
    monkeypatch.setattr(cudnn_prefill, "ENABLED", True)
    assert cudnn_prefill.prebuild_plans(16, 8, 128, torch.bfloat16, torch.device("cpu"), 16384, 32768) == 0
    monkeypatch.setattr(cudnn_prefill, "_usable", lambda *a: True)
    built = []
    monkeypatch.setattr(cudnn_prefill, "_build", lambda shapes, *a: built.append(len(shapes)))
    assert cudnn_prefill.prebuild_plans(16, 8, 128, torch.bfloat16, torch.device("cpu"), 16384, 32768) == 52
    assert built == [52]
    assert cudnn_prefill.prebuild_plans(16, 8, 128, torch.bfloat16, torch.device("cpu"), 512, 32768) == 0
    # max_model_len 4096 (W1's): no row can reach MIN_PAIRS, so start-up builds nothing
    assert cudnn_prefill.prebuild_plans(16, 8, 128, torch.bfloat16, torch.device("cpu"), 16384, 4096) == 0
    assert built == [52]

    def refuse(*a):
        raise RuntimeError("cuDNN Frontend error: no valid engine configs")
    monkeypatch.setattr(cudnn_prefill, "_build", refuse)
    assert cudnn_prefill.prebuild_plans(16, 8, 128, torch.bfloat16, torch.device("cpu"), 16384, 32768) == 0
    assert not cudnn_prefill.ENABLED
