"""Paged attention in plain PyTorch: the CPU path, and the oracle the GPU kernels are tested against.

KV cache of one layer: (2, num_blocks, block_size, num_kv_heads, head_dim); [0] holds K, [1] holds V.
Token t of a request lives in slot block_table[t // block_size] * block_size + t % block_size.
"""
import torch
import torch.nn.functional as F

from pagedllm.attention.metadata import AttentionMetadata


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store token i's K/V (num_tokens, num_kv_heads, head_dim) in slot slot_mapping[i]; slot -1 is padding."""
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    # view (not reshape): a non-contiguous cache must fail loudly, not be written through a copy.
    k_slots = kv_cache[0].view(-1, num_kv_heads, head_dim)   # (num_blocks * block_size, Hkv, D)
    v_slots = kv_cache[1].view(-1, num_kv_heads, head_dim)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_slots[slots] = k[keep].to(kv_cache.dtype)
    v_slots[slots] = v[keep].to(kv_cache.dtype)


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q (num_tokens, num_q_heads, head_dim) -> out of the same shape and dtype, request by request."""
    out = torch.empty_like(q)
    starts = meta.query_start_loc_cpu
    for i, seq_len in enumerate(meta.seq_lens_cpu):
        start, end = starts[i], starts[i + 1]
        if end == start:
            continue
        k, v = _gather_kv(kv_cache, meta.block_tables[i], seq_len)
        out[start:end] = _attend(q[start:end], k, v, scale)
    return out


def _gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int):
    """The first seq_len tokens' K and V, each (seq_len, num_kv_heads, head_dim), read through block_table."""
    block_size = kv_cache.shape[2]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = kv_cache[:, block_table[:num_blocks].long()]    # (2, nb, block_size, Hkv, D)
    kv = blocks.flatten(1, 2)[:, :seq_len]                    # (2, seq_len, Hkv, D)
    return kv[0], kv[1]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One request: q (L, Hq, D) are the last L of the S tokens whose k, v (S, Hkv, D) are given.

    Causal with offset: query j sits at position S - L + j and sees keys 0 .. S - L + j.
        keys   0 1 2 3 4 5
        q0     x x x x . .      (S = 6, L = 2)
        q1     x x x x x x
    """
    query_len, num_q_heads, _ = q.shape
    seq_len, num_kv_heads, _ = k.shape
    group = num_q_heads // num_kv_heads                       # GQA: q head h reads kv head h // group
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    q_pos = torch.arange(seq_len - query_len, seq_len, device=q.device)
    mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]   # (L, S)
    # float32 softmax for half inputs: bf16 accumulation drifts visibly over long contexts.
    qf, kf, vf = (x.float().transpose(0, 1) for x in (q, k, v))  # (H, L|S, D)
    out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, scale=scale)
    return out.transpose(0, 1).to(q.dtype)                     # (L, Hq, D)
