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


def _dense_reference(q, k, v, scale):
    """q (L, Hq, D); k, v (S, Hkv, D): plain causal attention with offset S - L, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    query_len, seq_len = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("lhd,shd->hls", q, k) * scale
    allowed = torch.arange(seq_len)[None, :] <= torch.arange(seq_len - query_len, seq_len)[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hls,shd->lhd", scores.softmax(-1), v)


def _make_batch(num_q_heads, num_kv_heads, dtype, seed=0):
    """A cache holding every request's K/V in shuffled blocks, plus the step's q and metadata."""
    gen = torch.Generator().manual_seed(seed)
    kv_cache = torch.zeros(2, NUM_BLOCKS, BLOCK_SIZE, num_kv_heads, HEAD_DIM, dtype=dtype)
    free_blocks = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    max_blocks = max(-(-s // BLOCK_SIZE) for s, _ in REQUESTS) + 2   # extra columns: padding with 0
    block_tables = torch.zeros(len(REQUESTS), max_blocks, dtype=torch.int32)
    qs, kvs, starts = [], [], [0]
    for i, (seq_len, query_len) in enumerate(REQUESTS):
        n = -(-seq_len // BLOCK_SIZE)
        block_tables[i, :n] = torch.tensor([free_blocks.pop() for _ in range(n)])
        k, v = (torch.randn(seq_len, num_kv_heads, HEAD_DIM, generator=gen).to(dtype) for _ in range(2))
        pos = torch.arange(seq_len)
        write_kv(kv_cache, k, v, block_tables[i].long()[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE)
        qs.append(torch.randn(query_len, num_q_heads, HEAD_DIM, generator=gen).to(dtype))
        kvs.append((k, v))
        starts.append(starts[-1] + query_len)
    seq_lens = [s for s, _ in REQUESTS]
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
