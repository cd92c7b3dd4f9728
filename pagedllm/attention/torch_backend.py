"""Paged attention in plain PyTorch: the CPU path, and the oracle the GPU kernels are tested against.

KV cache of one layer: (2, num_blocks, block_size, num_kv_heads, head_dim); [0] holds K, [1] holds V.
Token t of a request lives in slot block_table[t // block_size] * block_size + t % block_size.
An fp8 cache holds K / k_scale and V / v_scale (attention/kv_quant.py); reads dequantize to float32.

Sliding window W (as transformers: kv_idx > q_idx - W): the query at position p sees keys p - W < t <= p, W keys
itself included; only the blocks that can hold such keys are gathered. Soft cap c: each score s = (q . k) * scale
becomes c * tanh(s / c) before the softmax; SDPA has no such hook, so capped scores are computed explicitly.
"""
import torch
import torch.nn.functional as F

from pagedllm.attention.kv_quant import dequantize, is_fp8, quantize
from pagedllm.attention.metadata import AttentionMetadata


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
             k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Store token i's K/V (num_tokens, num_kv_heads, head_dim) in slot slot_mapping[i]; slot -1 is padding."""
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    # view (not reshape): a non-contiguous cache must fail loudly, not be written through a copy.
    k_slots = kv_cache[0].view(-1, num_kv_heads, head_dim)   # (num_blocks * block_size, Hkv, D)
    v_slots = kv_cache[1].view(-1, num_kv_heads, head_dim)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    if is_fp8(kv_cache.dtype):
        k_slots[slots], v_slots[slots] = quantize(k[keep], k_scale), quantize(v[keep], v_scale)
        return
    k_slots[slots] = k[keep].to(kv_cache.dtype)
    v_slots[slots] = v[keep].to(kv_cache.dtype)


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                    k_scale: float = 1.0, v_scale: float = 1.0, sliding_window: int | None = None,
                    soft_cap: float | None = None) -> torch.Tensor:
    """q (num_tokens, num_q_heads, head_dim) -> out of the same shape and dtype.

    Decode rows (one query token) run together, a bounded group at a time; prefill chunks one by one."""
    out = torch.empty_like(q)
    starts, seq_lens = meta.query_start_loc_cpu, meta.seq_lens_cpu
    block_size = kv_cache.shape[2]
    # each row's first block that can hold a key its queries see (0 without a window)
    first = [0] * meta.num_reqs if sliding_window is None else \
        [_first_block(seq_lens[i], starts[i + 1] - starts[i], sliding_window, block_size) for i in range(meta.num_reqs)]
    spans = [seq_lens[i] - first[i] * block_size for i in range(meta.num_reqs)]   # tokens gathered
    decode = [i for i in range(meta.num_reqs) if starts[i + 1] - starts[i] == 1]
    for group in _bounded_groups(decode, spans):
        rows = torch.tensor([starts[i] for i in group], device=q.device)
        out[rows] = _attend_decode(q[rows], kv_cache, meta.block_tables[torch.tensor(group, device=q.device)],
                                   [seq_lens[i] for i in group], [first[i] for i in group], scale, k_scale,
                                   v_scale, sliding_window, soft_cap)
    for i, seq_len in enumerate(seq_lens):
        start, end = starts[i], starts[i + 1]
        if end - start > 1:
            k, v = _gather_kv(kv_cache, meta.block_tables[i], seq_len, first[i])
            out[start:end] = _attend(q[start:end], dequantize(k, k_scale), dequantize(v, v_scale), scale,
                                     seq_len, sliding_window, soft_cap)
    return out


def _first_block(seq_len: int, query_len: int, window: int, block_size: int) -> int:
    """The block of the first key the earliest of the row's queries (position seq_len - query_len) sees."""
    return max(0, seq_len - query_len - window + 1) // block_size


def _bounded_groups(rows: list[int], seq_lens: list[int], max_tokens: int = 1 << 16):
    """Split rows so that one group's padded K/V gather holds at most ~max_tokens tokens."""
    group, longest = [], 0
    for i in rows:
        longest = max(longest, seq_lens[i])
        if group and longest * (len(group) + 1) > max_tokens:
            yield group
            group, longest = [], seq_lens[i]
        group.append(i)
    if group:
        yield group


def _gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int, first_block: int = 0):
    """K and V of tokens first_block * block_size .. seq_len - 1, each (tokens, num_kv_heads, head_dim), read
    through block_table."""
    block_size = kv_cache.shape[2]
    num_blocks = (seq_len + block_size - 1) // block_size
    # index_select copies whole blocks (2-3x faster on CPU than advanced indexing, which copies element-wise)
    blocks = kv_cache.index_select(1, block_table[first_block:num_blocks].long())   # (2, nb, block_size, Hkv, D)
    kv = blocks.flatten(1, 2)[:, :seq_len - first_block * block_size]          # (2, tokens, Hkv, D)
    return kv[0], kv[1]


def _attend_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: list[int],
                   first: list[int], scale: float, k_scale: float, v_scale: float, window: int | None,
                   soft_cap: float | None) -> torch.Tensor:
    """B decode rows: q (B, Hq, D); row b sees its keys from block first[b] up to seq_lens[b] (padded, masked).

        block table  | 0 | 1 | 2 | 3 | 4 |       first[b] = 2: the row gathers blocks 2..4 only;
        gathered             | 2 | 3 | 4 |       key j of it sits at position 2 * block_size + j
    """
    batch, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    num_blocks = max(-(-s // block_size) - f for s, f in zip(seq_lens, first))
    first_t = torch.tensor(first, device=q.device)
    # columns past a row's table are clamped: they gather some block whose keys the mask drops
    cols = (first_t[:, None] + torch.arange(num_blocks, device=q.device)).clamp_max(block_tables.shape[1] - 1)
    ids = block_tables.gather(1, cols).flatten().long()
    blocks = kv_cache.index_select(1, ids)                                                # (2, B * nb, ...): as above
    kv = blocks.view(2, batch, num_blocks * block_size, num_kv_heads, head_dim)         # (2, B, S, Hkv, D)
    k, v = (dequantize(x, s).transpose(1, 2) for x, s in ((kv[0], k_scale), (kv[1], v_scale)))  # (B, Hkv, S, D)
    # GQA without copying K/V: the group's query heads become the query axis of their kv head.
    qg = q.float().view(batch, num_kv_heads, num_q_heads // num_kv_heads, head_dim)
    pos = first_t[:, None] * block_size + torch.arange(k.shape[2], device=q.device)    # (B, S) key positions
    lens = torch.tensor(seq_lens, device=q.device)[:, None]
    mask = pos < lens
    if window is not None:
        mask &= pos >= lens - window
    out = _softmax_attend(qg, k, v, mask[:, None, None, :], scale, soft_cap)
    return out.reshape(batch, num_q_heads, head_dim).to(q.dtype)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, seq_len: int,
            window: int | None = None, soft_cap: float | None = None) -> torch.Tensor:
    """One request: q (L, Hq, D) are the last L of its seq_len tokens; k, v (S, Hkv, D) are its last S of them.

    Causal with offset: query j sits at position seq_len - L + j and sees keys 0 .. seq_len - L + j (and only
    the last `window` of those with a window).
        keys   0 1 2 3 4 5
        q0     x x x x . .      (seq_len = S = 6, L = 2)
        q1     x x x x x x
    """
    query_len, num_q_heads, head_dim = q.shape
    num_keys, num_kv_heads, _ = k.shape
    group = num_q_heads // num_kv_heads                       # GQA: q head h reads kv head h // group
    q_pos = torch.arange(seq_len - query_len, seq_len, device=q.device)[:, None]
    k_pos = torch.arange(seq_len - num_keys, seq_len, device=q.device)[None, :]
    mask = k_pos <= q_pos                                     # (L, S)
    if window is not None:
        mask &= k_pos > q_pos - window
    # float32 softmax for half inputs: bf16 accumulation drifts visibly over long contexts.
    # GQA without copying K/V: (L, Hkv, group, D) -> (Hkv, group * L, D), the mask tiled per group.
    qf = q.float().view(query_len, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
    qf = qf.reshape(num_kv_heads, group * query_len, head_dim)
    kf, vf = (x.float().transpose(0, 1) for x in (k, v))     # (Hkv, S, D)
    out = _softmax_attend(qf, kf, vf, mask.repeat(group, 1), scale, soft_cap)
    out = out.view(num_kv_heads, group, query_len, head_dim).permute(2, 0, 1, 3)
    return out.reshape(query_len, num_q_heads, head_dim).to(q.dtype)


def _softmax_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                    soft_cap: float | None, max_scores: int = 1 << 24) -> torch.Tensor:
    """float32 q (..., M, D), k and v (..., S, D), mask broadcast to (..., M, S) -> (..., M, D). Soft-capped
    scores are materialised, so a long prefill's queries run in slices of at most ~max_scores scores."""
    if soft_cap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    rows = max(1, max_scores // max(1, k.shape[:-1].numel()))
    outs = []
    for m in range(0, q.shape[-2], rows):
        scores = q[..., m:m + rows, :] @ k.transpose(-1, -2) * scale
        scores = torch.tanh(scores / soft_cap) * soft_cap
        part = mask if mask.shape[-2] == 1 else mask[..., m:m + rows, :]
        outs.append(scores.masked_fill(~part, float("-inf")).softmax(-1) @ v)
    return torch.cat(outs, dim=-2)
