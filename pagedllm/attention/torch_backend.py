"""Paged attention in plain PyTorch: the CPU path, and the oracle the GPU kernels are tested against.

KV cache of one layer: (2, num_blocks, block_size, num_kv_heads, head_dim); [0] holds K, [1] holds V.
Token t of a request lives in slot block_table[t // block_size] * block_size + t % block_size.
An fp8 cache holds K / k_scale and V / v_scale (attention/kv_quant.py); reads dequantize to float32.
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
                    k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """q (num_tokens, num_q_heads, head_dim) -> out of the same shape and dtype.

    Decode rows (one query token) run together, a bounded group at a time; prefill chunks one by one."""
    out = torch.empty_like(q)
    starts, seq_lens = meta.query_start_loc_cpu, meta.seq_lens_cpu
    decode = [i for i in range(meta.num_reqs) if starts[i + 1] - starts[i] == 1]
    for group in _bounded_groups(decode, seq_lens):
        rows = torch.tensor([starts[i] for i in group], device=q.device)
        lens = torch.tensor([seq_lens[i] for i in group], device=q.device)
        tables = meta.block_tables[torch.tensor(group, device=q.device)]
        out[rows] = _attend_decode(q[rows], kv_cache, tables, lens, max(seq_lens[i] for i in group), scale,
                                   k_scale, v_scale)
    for i, seq_len in enumerate(seq_lens):
        start, end = starts[i], starts[i + 1]
        if end - start > 1:
            k, v = _gather_kv(kv_cache, meta.block_tables[i], seq_len)
            out[start:end] = _attend(q[start:end], dequantize(k, k_scale), dequantize(v, v_scale), scale)
    return out


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


def _gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int):
    """The first seq_len tokens' K and V, each (seq_len, num_kv_heads, head_dim), read through block_table."""
    block_size = kv_cache.shape[2]
    num_blocks = (seq_len + block_size - 1) // block_size
    # index_select copies whole blocks (2-3x faster on CPU than advanced indexing, which copies element-wise)
    blocks = kv_cache.index_select(1, block_table[:num_blocks].long())   # (2, nb, block_size, Hkv, D)
    kv = blocks.flatten(1, 2)[:, :seq_len]                    # (2, seq_len, Hkv, D)
    return kv[0], kv[1]


def _attend_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                   max_seq_len: int, scale: float, k_scale: float, v_scale: float) -> torch.Tensor:
    """B decode rows: q (B, Hq, D); each sees its first seq_lens[b] tokens (padded to max_seq_len, masked)."""
    batch, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    num_blocks = (max_seq_len + block_size - 1) // block_size
    blocks = kv_cache.index_select(1, block_tables[:, :num_blocks].flatten().long())   # (2, B * nb, ...): as above
    kv = blocks.view(2, batch, num_blocks * block_size, num_kv_heads, head_dim)         # (2, B, S, Hkv, D)
    k, v = (dequantize(x, s).transpose(1, 2) for x, s in ((kv[0], k_scale), (kv[1], v_scale)))  # (B, Hkv, S, D)
    # GQA without copying K/V: the group's query heads become the query axis of their kv head.
    qg = q.float().view(batch, num_kv_heads, num_q_heads // num_kv_heads, head_dim)
    mask = torch.arange(k.shape[2], device=q.device)[None, :] < seq_lens[:, None]   # (B, S)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask[:, None, None, :], scale=scale)
    return out.reshape(batch, num_q_heads, head_dim).to(q.dtype)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One request: q (L, Hq, D) are the last L of the S tokens whose k, v (S, Hkv, D) are given.

    Causal with offset: query j sits at position S - L + j and sees keys 0 .. S - L + j.
        keys   0 1 2 3 4 5
        q0     x x x x . .      (S = 6, L = 2)
        q1     x x x x x x
    """
    query_len, num_q_heads, head_dim = q.shape
    seq_len, num_kv_heads, _ = k.shape
    group = num_q_heads // num_kv_heads                       # GQA: q head h reads kv head h // group
    q_pos = torch.arange(seq_len - query_len, seq_len, device=q.device)
    mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]   # (L, S)
    # float32 softmax for half inputs: bf16 accumulation drifts visibly over long contexts.
    # GQA without copying K/V: (L, Hkv, group, D) -> (Hkv, group * L, D), the mask tiled per group.
    qf = q.float().view(query_len, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
    qf = qf.reshape(num_kv_heads, group * query_len, head_dim)
    kf, vf = (x.float().transpose(0, 1) for x in (k, v))     # (Hkv, S, D)
    out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask.repeat(group, 1), scale=scale)
    out = out.view(num_kv_heads, group, query_len, head_dim).permute(2, 0, 1, 3)
    return out.reshape(query_len, num_q_heads, head_dim).to(q.dtype)
