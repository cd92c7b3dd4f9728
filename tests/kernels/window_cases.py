"""Sliding-window attention and attention-logit soft-capping in triton_backend, against a dense reference.

Shared by the GPU tests (test_triton_attention.py) and the Triton-interpreter run on CPU
(`python tests/kernels/window_cases.py [case ...]` with TRITON_INTERPRET=1, a process of its own).

The reference is written here, from the definition (float32, explicit masks), so that it does not depend on
torch_backend: the query at position p sees the keys t with p - window < t <= p (window keys, itself included:
transformers' kv_idx > q_idx - sliding_window), and a score s = (q . k) * scale becomes cap * tanh(s / cap).

Block-table entries of blocks that lie wholly before a row's window (less a tile's worth of keys: a kernel may
read the tile its window starts in) point far outside the cache, so a kernel that reads them faults.
"""
import dataclasses
import random
import sys

import torch
from attention_cases import (
    POISON_BLOCK,
    TOLERANCE,
    Batch,
    check_graph_padding,
    check_output,
    check_row_independent_of_batch,
    make_batch,
    random_rows,
    shared_prefix_plan,
    shared_prefix_rows,
)
from kernel_checks import rel_error

from pagedllm.attention.kv_quant import dequantize, is_fp8, quantize

MAX_TILE = 64     # the widest key tile a kernel reads: keys up to this far before a window may be read


@dataclasses.dataclass
class Layer:
    """triton_backend with one layer's window and cap bound, as the check functions of attention_cases call it."""
    backend: object
    sliding_window: int | None
    soft_cap: float | None

    def write_kv(self, *args, **kwargs):
        return self.backend.write_kv(*args, **kwargs)

    def paged_attention(self, q, kv_cache, meta, scale, k_scale=1.0, v_scale=1.0):
        return self.backend.paged_attention(q, kv_cache, meta, scale, k_scale, v_scale,
                                            sliding_window=self.sliding_window, soft_cap=self.soft_cap)


def reference(q, kv_cache, meta, scale, window=None, soft_cap=None, kv_scales=(1.0, 1.0)) -> torch.Tensor:
    """Dense attention of each row's queries over its keys (meta's block tables must be clean), float32."""
    num_tokens, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_cache.shape[2:4]
    group = num_q_heads // num_kv_heads
    slots_kv = kv_cache.view(2, -1, num_kv_heads, head_dim)
    out = torch.zeros(num_tokens, num_q_heads, head_dim, dtype=torch.float32, device=q.device)
    starts = meta.query_start_loc_cpu
    for i, seq_len in enumerate(meta.seq_lens_cpu):
        if seq_len == 0:
            continue
        t = torch.arange(seq_len, device=q.device)
        slots = meta.block_tables[i].long()[t // block_size] * block_size + t % block_size
        k = dequantize(slots_kv[0, slots], kv_scales[0]).repeat_interleave(group, dim=1)   # (S, Hq, D)
        v = dequantize(slots_kv[1, slots], kv_scales[1]).repeat_interleave(group, dim=1)
        query_len = starts[i + 1] - starts[i]
        for j in range(0, query_len, 256):              # a few hundred queries at a time: (Hq, 256, S) scores
            rows = q[starts[i] + j:starts[i] + min(j + 256, query_len)].float()          # (l, Hq, D)
            pos = torch.arange(seq_len - query_len + j, seq_len - query_len + j + rows.shape[0], device=q.device)
            s = torch.einsum("lhd,shd->hls", rows, k) * scale
            if soft_cap is not None:
                s = soft_cap * torch.tanh(s / soft_cap)
            visible = t[None, :] <= pos[:, None]
            if window is not None:
                visible &= t[None, :] > pos[:, None] - window
            s = s.masked_fill(~visible, float("-inf"))
            out[starts[i] + j:starts[i] + j + rows.shape[0]] = torch.einsum("hls,shd->lhd", s.softmax(-1), v)
    return out.to(q.dtype)


def write_step_kv(batch: Batch, kv_scales=(1.0, 1.0)) -> None:
    """This step's K/V into their slots (plain indexing; fp8 through kv_quant), padding (-1) skipped."""
    num_kv_heads, head_dim = batch.kv_cache.shape[3:]
    flat = batch.kv_cache.view(2, -1, num_kv_heads, head_dim)
    keep = batch.meta.slot_mapping >= 0
    slots = batch.meta.slot_mapping[keep]
    for j, (x, s) in enumerate(((batch.k, kv_scales[0]), (batch.v, kv_scales[1]))):
        flat[j, slots] = quantize(x[keep], s) if is_fp8(flat.dtype) else x[keep].to(flat.dtype)


def poison_before_window(batch: Batch, window: int | None) -> None:
    """Table entries of blocks wholly before each row's first query's window, less MAX_TILE keys: POISON_BLOCK."""
    if window is None:
        return
    block_size, starts = batch.kv_cache.shape[2], batch.meta.query_start_loc_cpu
    for i, seq_len in enumerate(batch.meta.seq_lens_cpu):
        first_key = seq_len - (starts[i + 1] - starts[i]) + 1 - window - MAX_TILE
        batch.meta.block_tables[i, :max(first_key, 0) // block_size] = POISON_BLOCK


def check_windowed(batch: Batch, backend, window, soft_cap, kv_scales=(1.0, 1.0)) -> float:
    """The layer's output matches the reference, padding rows are zeros, a decode row's output does not depend
    on its batch, and a CUDA graph's padding changes no real token's output."""
    layer = Layer(backend, window, soft_cap)
    scale = batch.q.shape[-1] ** -0.5
    write_step_kv(batch, kv_scales)
    poison_before_window(batch, window)
    ref = reference(batch.q, batch.kv_cache, batch.ref_meta, scale, window, soft_cap, kv_scales)
    out = layer.paged_attention(batch.q, batch.kv_cache, batch.meta, scale, *kv_scales)
    err = check_output(batch, out, ref, f"window {window} cap {soft_cap}: ")
    starts = batch.meta.query_start_loc_cpu
    decode = [i for i, s in enumerate(batch.meta.seq_lens_cpu) if s > 0 and starts[i + 1] - starts[i] == 1]
    if decode:
        check_row_independent_of_batch(batch, layer, max(decode, key=lambda i: batch.meta.seq_lens_cpu[i]),
                                       kv_scales, out=out)
    # an fp8 cache: graph padding writes K/V through the kernel (the interpreter's fp8 casts differ): recompute
    check_graph_padding(batch, layer, kv_scales=kv_scales, out=None if is_fp8(batch.kv_cache.dtype) else out)
    return err


def check_windowed_shared(batch: Batch, backend, window, soft_cap, kv_scales=(1.0, 1.0)) -> float:
    """With a shared-prefix plan in the step (planned for every layer alike): the output matches the reference
    (a windowed layer reads its rows' windows alone; a capped one reads the shared segments, capped)."""
    layer = Layer(backend, window, soft_cap)
    scale = batch.q.shape[-1] ** -0.5
    write_step_kv(batch, kv_scales)
    plan, num_items = shared_prefix_plan(batch, batch.kv_cache.shape[2])    # the runner's, on clean tables
    assert num_items > 0, "no shared segment found"
    poison_before_window(batch, window)     # a windowed layer that read the shared segments would fault
    ref = reference(batch.q, batch.kv_cache, batch.ref_meta, scale, window, soft_cap, kv_scales)
    got = layer.paged_attention(batch.q, batch.kv_cache, dataclasses.replace(batch.meta, shared=plan), scale,
                                *kv_scales)
    assert torch.isfinite(got).all() and (got[batch.padding] == 0).all()
    real = ~batch.padding
    err = rel_error(got[real], ref[real])
    assert err <= TOLERANCE[batch.q.dtype], f"shared prefix, window {window} cap {soft_cap}: error {err:.2e}"
    return err


@torch.no_grad()
def check_windowed_decode_qkv(rows, num_q_heads, num_kv_heads, head_dim, block_size, dtype, device, window,
                              soft_cap, seed=0, gemma=False) -> float:
    """decode_qkv (norm, rotary and the K/V store inside the decode kernel) with the layer's window and cap:
    its output matches the reference over the cache the torch code writes; graph padding changes nothing.
    gemma: Gemma 3's q/k norms (windows, caps and (1 + weight) norms together)."""
    from fused_cases import make_attention

    from pagedllm.attention import triton_backend
    gen = torch.Generator().manual_seed(seed)
    batch = make_batch(rows, num_q_heads, num_kv_heads, head_dim, block_size, dtype, device, seed=seed)
    meta, num_tokens = batch.meta, batch.q.shape[0]
    assert triton_backend.takes_qkv(meta, head_dim)
    attn = make_attention(num_q_heads, num_kv_heads, head_dim, True, device, max(s for s, _ in rows) + 1, gemma)
    for n in (attn.q_norm, attn.k_norm):
        n.weight.data = (torch.randn(head_dim, generator=gen) * 0.2 + (0 if gemma else 1)).to(device, dtype)
    width = (num_q_heads + 2 * num_kv_heads) * head_dim
    qkv = (torch.randn(num_tokens, width, generator=gen) * 2).to(device, dtype)
    positions = torch.tensor([s - 1 for s, q in rows for _ in range(q)], device=device).clamp_min(0)
    q, k, v = attn.rotate_qk_native(positions, qkv)
    batch.k, batch.v = k.view(num_tokens, num_kv_heads, head_dim), v.reshape(num_tokens, num_kv_heads, head_dim)
    cache = batch.kv_cache.clone()
    write_step_kv(batch)
    poison_before_window(batch, window)
    scale = head_dim ** -0.5
    ref = reference(q.view(num_tokens, num_q_heads, head_dim), batch.kv_cache, batch.ref_meta, scale, window,
                    soft_cap)
    args = (positions, attn.rotary_emb.cos_sin_cache, num_q_heads, *attn._norms())
    kw = dict(sliding_window=window, soft_cap=soft_cap, **({"unit_offset": True} if gemma else {}))
    again = cache.clone()
    out = triton_backend.decode_qkv(qkv, *args, cache, meta, scale, **kw)
    assert torch.isfinite(out).all() and (out[batch.padding] == 0).all()
    real = ~batch.padding
    err = rel_error(out[real], ref[real])
    assert err <= TOLERANCE[dtype], f"decode_qkv, window {window} cap {soft_cap}: relative error {err:.2e}"
    # padded as a small decode graph pads it: a row with no tokens, a token of no row (slot -1)
    padded = dataclasses.replace(
        meta, slot_mapping=torch.cat([meta.slot_mapping, meta.slot_mapping.new_full((1,), -1)]),
        query_start_loc=torch.cat([meta.query_start_loc, meta.query_start_loc.new_full((1,), num_tokens)]),
        seq_lens=torch.cat([meta.seq_lens, meta.seq_lens.new_zeros(1)]),
        block_tables=torch.cat([meta.block_tables, torch.full_like(meta.block_tables[:1], POISON_BLOCK)]),
        max_seq_len=2 * meta.max_seq_len, query_start_loc_cpu=meta.query_start_loc_cpu + [num_tokens],
        seq_lens_cpu=meta.seq_lens_cpu + [0])
    got = triton_backend.decode_qkv(torch.cat([qkv, qkv[:1]]), torch.cat([positions, positions[:1]]), *args[1:],
                                    again, padded, scale, **kw)
    assert torch.equal(got[:num_tokens], out), "graph padding changed a real token's output"
    return err


def rows_around(rng: random.Random, window: int | None) -> list[tuple[int, int]]:
    """Random rows plus, for the window: decode rows shorter and longer than it, chunks after context longer
    than it (one far longer: tiles wholly before its window), a fresh prompt longer than it, a row of many
    segments, padding."""
    w = min(window or 40, 50)    # longer windows: the same rows (some or all shorter than the window)
    rows = random_rows(rng, 4, max_context=120, max_query=20)
    rows += [(1, 1), (0, 1), (300, 1), (max(w // 2, 2), 1), (w + 70, 23), (w + 200, 9), (w + 17, w + 17),
             (w + 3, 1)]
    rng.shuffle(rows)
    return rows


# (q heads, kv heads, head_dim, block_size, dtype, window, soft cap, fp8 kv scales or None): every kernel path,
# windows shorter and longer than the rows, not multiples of a block or a tile, smaller than a prefill q block
# (four cases, two a process: the CPU suite's budget; the GPU tests run the wider grid)
CASES = [
    (4, 4, 32, 32, torch.float16, 5, 3.0, None),
    (6, 2, 16, 16, torch.bfloat16, None, 2.5, None),
    (8, 1, 32, 16, torch.float32, 100, None, None),
    (6, 2, 32, 32, torch.bfloat16, 50, 3.0, (0.43, 2.7)),
]


def as_fp8(batch: Batch, kv_scales) -> Batch:
    """The batch's cache noise (context K/V) as an fp8 cache holds it; this step's K/V at the scales' size."""
    noise = batch.kv_cache.float()
    batch.kv_cache = torch.stack([quantize(noise[0] * kv_scales[0], kv_scales[0]),
                                  quantize(noise[1] * kv_scales[1], kv_scales[1])])
    batch.k = (batch.k.float() * kv_scales[0]).to(batch.q.dtype)
    batch.v = (batch.v.float() * kv_scales[1]).to(batch.q.dtype)
    return batch


def run_case(index: int, device: str) -> str:
    from pagedllm.attention import triton_backend
    hq, hkv, dim, bs, dtype, window, cap, kv_scales = CASES[index]
    scales = kv_scales or (1.0, 1.0)
    name = f"hq{hq}-hkv{hkv}-d{dim}-bs{bs}-{str(dtype)[6:]}-w{window}-cap{cap}{'-fp8' if kv_scales else ''}"
    rng = random.Random(index)

    def batch(rows, **kw):
        b = make_batch(rows, hq, hkv, dim, bs, dtype, device, seed=index, **kw)
        return as_fp8(b, kv_scales) if kv_scales else b

    err = check_windowed(batch(rows_around(rng, window)), triton_backend, window, cap, scales)
    # a small decode-only step (its own, shorter segments)
    small = [(300, 1), (1, 1), (0, 1), ((window or 40) + 9, 1), (150, 1)]
    err = max(err, check_windowed(batch(small), triton_backend, window, cap, scales))
    rows, shared = shared_prefix_rows(random.Random(index), 2 * triton_backend.PARTITION, groups=2, per_group=3,
                                      block_size=bs)
    err = max(err, check_windowed_shared(batch(rows, shared=shared), triton_backend, window, cap, scales))
    if not kv_scales:
        err = max(err, check_windowed_decode_qkv(small, hq, hkv, dim, bs, dtype, device, window, cap, seed=index))
    return f"ok {name} rel_err={err:.1e}"


def run_interpreter(cases: list[int]) -> None:
    from attention_cases import _patch_interpreter as patch_attention
    from fused_cases import _patch_interpreter as patch_casts

    from pagedllm.attention import cudnn_prefill, triton_backend
    patch_attention()
    patch_casts()
    triton_backend.PARTITION, triton_backend.MAX_SEGMENTS, triton_backend.SMALL_BATCH_PARTITION = 64, 4, 32

    # Every prefill row qualifies for the long-prompt path (as on Hopper): windowed or capped layers keep theirs
    def refuse(*args, **kwargs):
        raise AssertionError("a windowed or soft-capped layer's rows went to cuDNN / FA4")
    cudnn_prefill.LONG_QUERY_LEN, cudnn_prefill.MIN_PAIRS, cudnn_prefill.attend = 2, 0, refuse
    cudnn_prefill._usable = lambda *args: True
    torch.cuda.is_current_stream_capturing = lambda: False     # CPU torch has no CUDA to ask
    plain = make_batch([(30, 20), (5, 1)], 4, 2, 16, 16, torch.float32, "cpu")
    assert cudnn_prefill.threshold(plain.q, plain.meta) == 20, "the patch routes no row: the check would not bite"
    for i in cases:
        print(run_case(i, "cpu"), flush=True)


if __name__ == "__main__":
    run_interpreter([int(a) for a in sys.argv[1:]] or list(range(len(CASES))))
