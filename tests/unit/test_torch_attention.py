"""torch_backend vs a dense causal attention computed per request in float64."""
import pytest
import torch

from pagedllm.attention import get_attention_backend
from pagedllm.attention.metadata import AttentionMetadata
from pagedllm.attention.torch_backend import paged_attention, write_kv

BLOCK_SIZE = 4
NUM_BLOCKS = 40
HEAD_DIM = 16
# (seq_len, query_len): decode rows, a prefill, chunks with context, block-aligned edges
REQUESTS = [(1, 1), (9, 1), (13, 13), (20, 5), (16, 16), (33, 1), (8, 3)]


def _dense_reference(q, k, v, scale, window=None, soft_cap=None):
    """q (L, Hq, D); k, v (S, Hkv, D): plain causal attention with offset S - L, in float64; with a window, query
    p sees keys p - window < t <= p (transformers' sliding mask); soft_cap: scores cap * tanh(scores / cap)."""
    q, k, v = q.double(), k.double(), v.double()
    query_len, seq_len = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("lhd,shd->hls", q, k) * scale
    if soft_cap is not None:
        scores = soft_cap * torch.tanh(scores / soft_cap)
    k_pos, q_pos = torch.arange(seq_len)[None, :], torch.arange(seq_len - query_len, seq_len)[:, None]
    allowed = (k_pos <= q_pos) & (k_pos > q_pos - (window or seq_len))
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hls,shd->lhd", scores.softmax(-1), v)


def _make_batch(num_q_heads, num_kv_heads, dtype, seed=0, requests=REQUESTS, num_blocks=NUM_BLOCKS):
    """A cache holding every request's K/V in shuffled blocks, plus the step's q and metadata."""
    gen = torch.Generator().manual_seed(seed)
    kv_cache = torch.zeros(2, num_blocks, BLOCK_SIZE, num_kv_heads, HEAD_DIM, dtype=dtype)
    free_blocks = torch.randperm(num_blocks, generator=gen).tolist()
    max_blocks = max(-(-s // BLOCK_SIZE) for s, _ in requests) + 2   # extra columns: padding with 0
    block_tables = torch.zeros(len(requests), max_blocks, dtype=torch.int32)
    qs, kvs, starts = [], [], [0]
    for i, (seq_len, query_len) in enumerate(requests):
        n = -(-seq_len // BLOCK_SIZE)
        block_tables[i, :n] = torch.tensor([free_blocks.pop() for _ in range(n)])
        k, v = (torch.randn(seq_len, num_kv_heads, HEAD_DIM, generator=gen).to(dtype) for _ in range(2))
        pos = torch.arange(seq_len)
        write_kv(kv_cache, k, v, block_tables[i].long()[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE)
        qs.append(torch.randn(query_len, num_q_heads, HEAD_DIM, generator=gen).to(dtype))
        kvs.append((k, v))
        starts.append(starts[-1] + query_len)
    seq_lens = [s for s, _ in requests]
    meta = AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.int64),   # unused by paged_attention
        query_start_loc=torch.tensor(starts, dtype=torch.int32), seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=block_tables, max_query_len=max(q.shape[0] for q in qs), max_seq_len=max(seq_lens),
        query_start_loc_cpu=starts, seq_lens_cpu=seq_lens)
    return torch.cat(qs), kv_cache, meta, kvs


@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(4, 2), (4, 4), (8, 1)])
def test_paged_attention_matches_dense_float32(num_q_heads, num_kv_heads):
    q, kv_cache, meta, kvs = _make_batch(num_q_heads, num_kv_heads, torch.float32)
    scale = HEAD_DIM ** -0.5
    out = paged_attention(q, kv_cache, meta, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    starts = meta.query_start_loc_cpu
    for i, (k, v) in enumerate(kvs):
        ref = _dense_reference(q[starts[i]:starts[i + 1]], k, v, scale)
        torch.testing.assert_close(out[starts[i]:starts[i + 1]].double(), ref, atol=1e-5, rtol=1e-5)


def test_paged_attention_bfloat16_keeps_dtype_and_accuracy():
    q, kv_cache, meta, kvs = _make_batch(4, 2, torch.bfloat16, seed=1)
    out = paged_attention(q, kv_cache, meta, HEAD_DIM ** -0.5)
    assert out.dtype == torch.bfloat16
    starts = meta.query_start_loc_cpu
    for i, (k, v) in enumerate(kvs):
        ref = _dense_reference(q[starts[i]:starts[i + 1]], k, v, HEAD_DIM ** -0.5)
        torch.testing.assert_close(out[starts[i]:starts[i + 1]].double(), ref, atol=2e-2, rtol=2e-2)


def test_write_kv_round_trip_and_padding_slots_skipped():
    kv_cache = torch.zeros(2, 4, BLOCK_SIZE, 2, HEAD_DIM)
    k, v = torch.randn(6, 2, HEAD_DIM), torch.randn(6, 2, HEAD_DIM)
    slots = torch.tensor([5, -1, 0, 14, -1, 9])
    write_kv(kv_cache, k, v, slots)
    flat_k, flat_v = kv_cache[0].view(-1, 2, HEAD_DIM), kv_cache[1].view(-1, 2, HEAD_DIM)
    keep = slots >= 0
    torch.testing.assert_close(flat_k[slots[keep]], k[keep], rtol=0, atol=0)
    torch.testing.assert_close(flat_v[slots[keep]], v[keep], rtol=0, atol=0)
    untouched = torch.ones(16, dtype=torch.bool)
    untouched[slots[keep]] = False
    assert untouched[-1]   # slot -1 must not wrap around to the last slot
    assert flat_k[untouched].abs().sum() == 0 and flat_v[untouched].abs().sum() == 0


def test_write_kv_rejects_non_contiguous_cache():
    kv_cache = torch.zeros(2, 4, 2, BLOCK_SIZE, HEAD_DIM).transpose(2, 3)   # (2, 4, bs, H, D), strided
    with pytest.raises(RuntimeError):
        write_kv(kv_cache, torch.randn(1, 2, HEAD_DIM), torch.randn(1, 2, HEAD_DIM), torch.tensor([0]))


def test_cpu_backend_is_torch():
    from pagedllm.attention import torch_backend
    assert get_attention_backend(torch.device("cpu")) is torch_backend


def test_decode_rows_in_small_groups_give_the_same_result(monkeypatch):
    from pagedllm.attention import torch_backend
    assert list(torch_backend._bounded_groups([0, 1, 2, 3], [10, 30, 5, 40], max_tokens=64)) == [[0, 1], [2], [3]]
    q, kv_cache, meta, _ = _make_batch(4, 2, torch.float32)
    whole = paged_attention(q, kv_cache, meta, 0.3)
    groups = torch_backend._bounded_groups
    monkeypatch.setattr(torch_backend, "_bounded_groups", lambda rows, lens: groups(rows, lens, max_tokens=1))
    torch.testing.assert_close(paged_attention(q, kv_cache, meta, 0.3), whole, atol=1e-6, rtol=1e-6)


# windows: inside one block, across a block edge, longer than some rows, longer than all
@pytest.mark.parametrize("window", [1, 3, 6, 17, 64])
@pytest.mark.parametrize("soft_cap", [None, 1.5])
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(4, 2), (8, 1)])
def test_sliding_window_and_soft_cap_match_dense(window, soft_cap, num_q_heads, num_kv_heads):
    """Decode rows and prefill chunks with context (a prefix hit, chunked prefill: queries are the last L of S)."""
    q, kv_cache, meta, kvs = _make_batch(num_q_heads, num_kv_heads, torch.float32, seed=2)
    scale = 0.7   # large scores, so that a cap of 1.5 changes them a lot
    out = paged_attention(q, kv_cache, meta, scale, sliding_window=window, soft_cap=soft_cap)
    starts = meta.query_start_loc_cpu
    for i, (k, v) in enumerate(kvs):
        ref = _dense_reference(q[starts[i]:starts[i + 1]], k, v, scale, window, soft_cap)
        torch.testing.assert_close(out[starts[i]:starts[i + 1]].double(), ref, atol=1e-5, rtol=1e-5)


def test_soft_cap_alone_and_bfloat16():
    q, kv_cache, meta, kvs = _make_batch(4, 2, torch.bfloat16, seed=3)
    out = paged_attention(q, kv_cache, meta, 0.7, soft_cap=2.0)
    assert out.dtype == torch.bfloat16
    starts = meta.query_start_loc_cpu
    for i, (k, v) in enumerate(kvs):
        ref = _dense_reference(q[starts[i]:starts[i + 1]], k, v, 0.7, soft_cap=2.0)
        torch.testing.assert_close(out[starts[i]:starts[i + 1]].double(), ref, atol=2e-2, rtol=2e-2)
    uncapped = paged_attention(q, kv_cache, meta, 0.7)
    assert (uncapped.float() - out.float()).abs().max() > 0.1   # the cap changed the result


def test_sliding_window_reads_only_the_blocks_in_the_window():
    """Long decode rows and a chunk far into its context: every block wholly before a row's window holds NaN,
    which would reach the output if it were read (0 * NaN), so the result being exact shows it was not."""
    requests = [(203, 1), (97, 1), (150, 6), (40, 1)]
    window = 10
    q, kv_cache, meta, kvs = _make_batch(4, 2, torch.float32, seed=4, requests=requests, num_blocks=160)
    in_window = set()
    for i, (seq_len, query_len) in enumerate(requests):
        first = (seq_len - query_len - window + 1) // BLOCK_SIZE
        in_window |= set(meta.block_tables[i, first:-(-seq_len // BLOCK_SIZE)].tolist())
    in_window.add(0)   # the tables' padding
    for b in set(range(160)) - in_window:
        kv_cache[:, b] = float("nan")
    out = paged_attention(q, kv_cache, meta, 0.5, sliding_window=window)
    starts = meta.query_start_loc_cpu
    for i, (k, v) in enumerate(kvs):
        ref = _dense_reference(q[starts[i]:starts[i + 1]], k, v, 0.5, window)
        torch.testing.assert_close(out[starts[i]:starts[i + 1]].double(), ref, atol=1e-5, rtol=1e-5)


def test_soft_capped_prefill_in_query_slices_gives_the_same_result(monkeypatch):
    from pagedllm.attention import torch_backend
    q, k, v = torch.randn(40, 4, HEAD_DIM), torch.randn(50, 2, HEAD_DIM), torch.randn(50, 2, HEAD_DIM)
    whole = torch_backend._attend(q, k, v, 0.5, 50, window=7, soft_cap=2.0)
    attend = torch_backend._softmax_attend
    monkeypatch.setattr(torch_backend, "_softmax_attend", lambda *a: attend(*a, max_scores=2 * 50 * 3))   # 3 rows
    torch.testing.assert_close(torch_backend._attend(q, k, v, 0.5, 50, window=7, soft_cap=2.0), whole,
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("window,cap,passed", [(None, None, {}), (8, None, {"sliding_window": 8}),
                                               (None, 30.0, {"soft_cap": 30.0}),
                                               (8, 30.0, {"sliding_window": 8, "soft_cap": 30.0})])
def test_attention_layer_passes_window_and_cap_only_when_set(window, cap, passed):
    """A plain layer's backend calls carry no new keyword (a backend without them still serves it)."""
    from types import SimpleNamespace
    from pagedllm.attention.metadata import set_forward_context
    from pagedllm.layers.attention import Attention
    calls = []
    backend = SimpleNamespace(
        write_kv=lambda *a, **kw: None,
        paged_attention=lambda q, *a, **kw: calls.append(kw) or q,
        decode_qkv=lambda qkv, *a, **kw: calls.append(kw) or torch.zeros(qkv.shape[0], 4, HEAD_DIM))
    layer = Attention(0, 4, 2, HEAD_DIM, 0.25, sliding_window=window, logits_soft_cap=cap)
    layer.backend = backend
    meta = SimpleNamespace(slot_mapping=torch.zeros(3, dtype=torch.int64))
    with set_forward_context(meta, [torch.zeros(2, 1, BLOCK_SIZE, 2, HEAD_DIM)]):
        layer(torch.zeros(3, 4 * HEAD_DIM), torch.zeros(3, 2 * HEAD_DIM), torch.zeros(3, 2 * HEAD_DIM))
        layer.forward_qkv(torch.zeros(3, 8 * HEAD_DIM), torch.zeros(3), torch.zeros(1), None, None)
    assert calls == [{"k_scale": 1.0, "v_scale": 1.0, **passed}] * 2


@pytest.mark.parametrize("unit_offset,passed", [(False, {}), (True, {"unit_offset": True})])
def test_attention_layer_passes_gemma_norms_only_when_set(unit_offset, passed):
    """forward_qkv hands the backend's decode_qkv the q/k norms' unit_offset (Gemma 3's (1 + weight) norms) only
    when set: every other model's calls stay those of a backend without it."""
    from types import SimpleNamespace
    from pagedllm.attention.metadata import set_forward_context
    from pagedllm.layers.attention import Attention
    calls = []
    backend = SimpleNamespace(decode_qkv=lambda qkv, *a, **kw: calls.append(kw) or torch.zeros(3, 4, HEAD_DIM))
    layer = Attention(0, 4, 2, HEAD_DIM, 0.25, sliding_window=8)
    layer.backend = backend
    norms = [(torch.ones(HEAD_DIM), 1e-6)] * 2
    with set_forward_context(SimpleNamespace(), [torch.zeros(2, 1, BLOCK_SIZE, 2, HEAD_DIM)]):
        layer.forward_qkv(torch.zeros(3, 8 * HEAD_DIM), torch.zeros(3), torch.zeros(1), *norms, unit_offset=unit_offset)
    assert calls == [{"k_scale": 1.0, "v_scale": 1.0, "sliding_window": 8, **passed}]
