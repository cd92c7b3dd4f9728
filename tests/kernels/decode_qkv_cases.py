"""triton_backend.decode_qkv (decode-only steps: q/k norm, rotary and the K/V store inside the decode kernel)
against the torch code it replaces: LlamaAttention.rotate_qk_native, torch_backend.write_kv, paged_attention.

Shared by the GPU tests (test_decode_qkv.py) and the Triton-interpreter run on CPU
(`python tests/kernels/decode_qkv_cases.py` with TRITON_INTERPRET=1). The interpreter casts to fp8 wrongly
(fp8_kv_cases.py), so fp8 caches are checked on CUDA only.
"""
import dataclasses
import random

import torch
from attention_cases import POISON_BLOCK, TOLERANCE, _bytes, make_batch, random_rows
from fused_cases import check_same_rounding, make_attention
from kernel_checks import rel_error

from pagedllm.attention import torch_backend
from pagedllm.attention.kv_quant import quantize


@torch.no_grad()
def check_decode_qkv(rows, num_q_heads, num_kv_heads, head_dim, block_size, dtype, device, qk_norm=True,
                     cache_dtype=None, kv_scales=(1.0, 1.0), seed=0, gemma=False) -> float:
    """rows: decode rows (ctx + 1, 1) and padding rows (0, 1). The output matches the torch code's; the new
    tokens' V bytes are its bytes and their K within the dtype's tolerance (the variance may sum in another
    order; an fp8 cache: each value within one e4m3 step of it and of where a cancelling rotation moves it); no
    other byte of the cache changes; rows padded as a CUDA graph pads them change nothing. gemma: Gemma 3's q/k
    norms (the layer's unit_offset)."""
    from pagedllm.attention import triton_backend
    gen = torch.Generator().manual_seed(seed)
    batch = make_batch(rows, num_q_heads, num_kv_heads, head_dim, block_size, dtype, device, seed=seed)
    meta, num_tokens = batch.meta, batch.q.shape[0]
    assert triton_backend.takes_qkv(meta, head_dim) == (len(rows) <= triton_backend.SMALL_BATCH_ROWS)
    if cache_dtype == torch.float8_e4m3fn:
        noise = batch.kv_cache.float()
        batch.kv_cache = torch.stack([quantize(noise[0] * kv_scales[0], kv_scales[0]),
                                      quantize(noise[1] * kv_scales[1], kv_scales[1])])
    # the rotary table (float32) covers every row's position: a gather past its end is a device-side assert
    attn = make_attention(num_q_heads, num_kv_heads, head_dim, qk_norm, device, max(s for s, _ in rows) + 1, gemma)
    if qk_norm or gemma:
        for n in (attn.q_norm, attn.k_norm):
            # about 1 (Llama's), or Gemma's offset from 1 about 0
            n.weight.data = (torch.randn(head_dim, generator=gen) * 0.2 + (0 if gemma else 1)).to(device, dtype)
    width = (num_q_heads + 2 * num_kv_heads) * head_dim
    qkv = (torch.randn(num_tokens, width + 7, generator=gen) * 2).to(device, dtype)[:, :width]   # rows strided
    positions = torch.tensor([s - 1 for s, q in rows for _ in range(q)], device=device).clamp_min(0)

    ref_cache = batch.kv_cache.clone()
    q, k, v = attn.rotate_qk_native(positions, qkv)
    torch_backend.write_kv(ref_cache, k.view(num_tokens, num_kv_heads, head_dim),
                           v.reshape(num_tokens, num_kv_heads, head_dim), meta.slot_mapping, *kv_scales)
    scale = head_dim ** -0.5
    ref = torch_backend.paged_attention(q.view(num_tokens, num_q_heads, head_dim), ref_cache, batch.ref_meta, scale,
                                        *kv_scales)
    cache = batch.kv_cache.clone()
    args = (positions, attn.rotary_emb.cos_sin_cache, num_q_heads, *attn._norms())
    kw = {"unit_offset": True} if attn.unit_offset else {}
    out = triton_backend.decode_qkv(qkv, *args, cache, meta, scale, *kv_scales, **kw)

    if cache_dtype == torch.float8_e4m3fn:
        # the new token's K may be one e4m3 step from write_kv's (checked below): on 1 row of a few hundred
        # tokens that alone moves the output by 3e-2-1.2e-1 (torch, one step on a quarter of the values), so the
        # attention is checked over the cache decode_qkv wrote
        ref = torch_backend.paged_attention(q.view(num_tokens, num_q_heads, head_dim), cache, batch.ref_meta,
                                            scale, *kv_scales)
    assert out.shape == ref.shape and out.dtype == dtype and torch.isfinite(out).all()
    assert (out[batch.padding] == 0).all(), "padding rows must be zeros"
    real = ~batch.padding
    err = rel_error(out[real], ref[real])
    assert err <= TOLERANCE[dtype], f"decode_qkv: relative error {err:.2e} > {TOLERANCE[dtype]:.0e}"
    slots = meta.slot_mapping[meta.slot_mapping >= 0]
    flat, ref_flat = (c.view(2, -1, num_kv_heads, head_dim) for c in (cache, ref_cache))
    written = torch.zeros(flat.shape[1], dtype=torch.bool, device=device)
    written[slots] = True
    assert torch.equal(_bytes(flat[:, ~written]), _bytes(ref_flat[:, ~written])), "a slot not written changed"
    assert torch.equal(_bytes(flat[1, written]), _bytes(ref_flat[1, written])), "V differs from write_kv's bytes"
    k, ref_k = flat[0, written].float(), ref_flat[0, written].float()
    k_err = rel_error(k, ref_k)
    if cache_dtype == torch.float8_e4m3fn:
        # the norm's variance sums in another order: a last bit of rstd may move a normed value by one bf16 step
        # (2^-8 of it), and the rotation x1 * cos - x2 * sin may cancel, so the rotated value moves by up to
        # ~2^-7 of its pair's norm however small it is; then it may round to the next e4m3 value (3 mantissa
        # bits: a step is at most 2^-3 of the value, 2^-9 below e4m3's normal range). A flipped rotation sign
        # moves most values by about their pair's norm and fails it.
        partner = torch.arange(head_dim, device=device) ^ (head_dim // 2)
        pair = torch.hypot(ref_k, ref_k[..., partner])
        step = torch.maximum(k.abs(), ref_k.abs()) * 2 ** -3 + 2 ** -9 + pair * 2 ** -5
        assert ((k - ref_k).abs() <= step).all(), "decode_qkv: a stored fp8 K more than one e4m3 step off"
    else:
        assert k_err <= TOLERANCE[dtype], f"decode_qkv: stored K off by {k_err:.2e}"
        if gemma:   # Gemma's norm rounds once (a check the error bound alone would not make)
            check_same_rounding("decode_qkv K", flat[0, written], ref_flat[0, written])

    # padded as the runner pads a small decode graph: rows with no tokens, tokens of no row (slot -1)
    extra_rows, extra_tokens = 2, 3
    if triton_backend.decode_partition(meta) == triton_backend.SMALL_BATCH_PARTITION:   # stays a small step
        extra_rows = min(extra_rows, triton_backend.SMALL_BATCH_ROWS - len(rows))

    def pad(t, n, value):
        return torch.cat([t, torch.full((n, *t.shape[1:]), value, dtype=t.dtype, device=device)])

    padded = dataclasses.replace(
        meta, slot_mapping=pad(meta.slot_mapping, extra_tokens, -1),
        query_start_loc=pad(meta.query_start_loc, extra_rows, num_tokens), seq_lens=pad(meta.seq_lens, extra_rows, 0),
        block_tables=pad(meta.block_tables, extra_rows, POISON_BLOCK), max_seq_len=2 * meta.max_seq_len,
        query_start_loc_cpu=meta.query_start_loc_cpu + [num_tokens] * extra_rows,
        seq_lens_cpu=meta.seq_lens_cpu + [0] * extra_rows)
    # qkv padded with its row stride kept, as a graph's static buffer keeps the GEMM output's: a stride that
    # is a multiple of 16 builds another specialisation, whose loads may give the norm's variance another
    # summation order (the H100 failed here on qk_norm's 200-row cases only, where a last bit shows)
    padded_qkv = torch.full((num_tokens + extra_tokens, qkv.stride(0)), 3.0, dtype=dtype, device=device)
    padded_qkv = padded_qkv[:, :qkv.shape[1]]
    padded_qkv[:num_tokens] = qkv
    again = batch.kv_cache.clone()
    got = triton_backend.decode_qkv(padded_qkv, pad(positions, extra_tokens, 1), *args[1:], again,
                                    padded, scale, *kv_scales, **kw)
    assert torch.equal(got[:num_tokens], out), "graph padding changed a real token's output"
    assert torch.equal(_bytes(again), _bytes(cache)), "graph padding changed the cache"
    return max(err, k_err)


def decode_rows(rng: random.Random, num_rows: int, max_context: int) -> list[tuple[int, int]]:
    """Decode rows and a padding row, one of them long enough for many segments."""
    rows = random_rows(rng, num_rows, max_context, 1, kinds=("decode", "decode", "padding"))
    return rows + [(1, 1), (0, 1), (7 * max_context, 1)]


# Small shapes for the interpreter (head_dim a power of two: decode_qkv's tiles are whole heads)
def interpreter_cases():
    rng = random.Random(5)
    for i, (hq, hkv, dim, bs, dtype, norm) in enumerate([
            (4, 2, 16, 16, torch.float32, "llama"), (4, 4, 32, 32, torch.float16, None),
            (6, 2, 16, 16, torch.bfloat16, "llama"), (8, 1, 32, 16, torch.float32, None),
            (4, 2, 16, 16, torch.bfloat16, "gemma")]):   # bf16: check_same_rounding bites
        yield f"hq{hq}-hkv{hkv}-d{dim}-{str(dtype)[6:]}-norm_{norm}", (
            decode_rows(rng, 4, 60), hq, hkv, dim, bs, dtype, norm, i)


def run_interpreter() -> None:
    from attention_cases import _patch_interpreter as patch_attention
    from fused_cases import _patch_interpreter as patch_casts

    from pagedllm.attention import triton_backend
    patch_attention()
    patch_casts()
    triton_backend.PARTITION, triton_backend.MAX_SEGMENTS, triton_backend.SMALL_BATCH_PARTITION = 64, 4, 32
    for name, (rows, hq, hkv, dim, bs, dtype, norm, seed) in interpreter_cases():
        kw = dict(qk_norm=norm is not None, gemma=norm == "gemma")
        err = check_decode_qkv(rows, hq, hkv, dim, bs, dtype, "cpu", seed=seed, **kw)
        many = check_decode_qkv(rows * 2, hq, hkv, dim, bs, dtype, "cpu", seed=seed + 10, **kw)   # > 8 rows
        print(f"ok {name} rel_err={max(err, many):.1e}", flush=True)


if __name__ == "__main__":
    run_interpreter()
