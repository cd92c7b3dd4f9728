"""Why an fp8 KV cache does not speed up decode attention, and what would: the split-KV decode kernel's tile step
in four ways of reading fp8 K/V, timed against the bf16 cache on the same shapes (issue 18).

    MODE 0  fp8 -> q's dtype (bf16) for tl.dot: what triton_backend ships
    MODE 1  fp8 -> fp16 (one cvt per pair on sm_89+), q in fp16 once per program: both dots in fp16
    MODE 2  fp8 -> fp16 by bits (sign | (byte & 0x7f) << 7: the value times 2^-8, denormals included), fp16 dots,
            2^8 folded into the scales
    MODE 3  no tl.dot: the GROUP query heads only (not padded to 16 rows), products and sums in fp32 registers
    MODE 4  as MODE 1, operands swapped: s^T = K q^T and acc^T = V^T p^T, so the keys (TILE_N >= 64) and the head
            dims are the dots' M side, where Hopper's wgmma can take them, and the 16 padded query rows the N side

Each variant's output is checked against the torch reference (relative error). Times: triton.testing.do_bench
medians. Variants live here, not in the engine, until one is measured to win.

    PYTHONPATH=$PWD python3 benchmarks/fp8_decode_variants.py
"""
import dataclasses
import random
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kernels"))
from attention_cases import make_batch, rel_error  # noqa: E402

from pagedllm.attention import torch_backend, triton_backend  # noqa: E402
from pagedllm.attention.kernels.decode_partition import segment_len  # noqa: E402


@triton.jit
def _tile(q, acc, m_i, l_i, tile_start, kv_stop, table, kv_head, k_cache_ptr, v_cache_ptr, dims, dim_ok,
          scale_log2, stride_c_block, stride_c_slot, stride_c_head,
          BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, MODE: tl.constexpr):
    keys = tile_start + tl.arange(0, TILE_N)
    key_ok = keys < kv_stop
    block = tl.load(table + keys // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
    kv_off = block * stride_c_block + (keys % BLOCK_SIZE) * stride_c_slot + kv_head * stride_c_head
    kv_mask = key_ok[:, None] & dim_ok[None, :]
    k = tl.load(k_cache_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_cache_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
    if MODE == 0:
        k = k.to(q.dtype)
        v = v.to(q.dtype)
    elif MODE == 1 or MODE == 4:
        k = k.to(tl.float16)
        v = v.to(tl.float16)
    elif MODE == 2:
        kb = k.to(tl.uint8, bitcast=True).to(tl.uint16)
        vb = v.to(tl.uint8, bitcast=True).to(tl.uint16)
        k = (((kb & 0x80) << 8) | ((kb & 0x7F) << 7)).to(tl.float16, bitcast=True)
        v = (((vb & 0x80) << 8) | ((vb & 0x7F) << 7)).to(tl.float16, bitcast=True)
    if MODE == 4:   # acc is (HEAD_PAD, BLOCK_M) here: transposed
        st = tl.dot(k, tl.trans(q)) * scale_log2
        st = tl.where(key_ok[:, None], st, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(st, axis=0))
        pt = tl.math.exp2(st - m_new[None, :])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(pt, axis=0)
        acc = acc * alpha[None, :] + tl.dot(tl.trans(v), pt.to(v.dtype))
        return acc, m_new, l_i
    if MODE == 3:
        s = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2) * scale_log2
    else:
        s = tl.dot(q, tl.trans(k)) * scale_log2
    s = tl.where(key_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if MODE == 3:
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["num_splits"])
def _decode_partition(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, first_seg_ptr,
    part_out_ptr, part_max_ptr, part_sum_ptr,
    scale_log2, v_scale, num_splits,
    stride_q_tok, stride_q_head, stride_bt,
    stride_c_block, stride_c_slot, stride_c_head,
    stride_po_req, stride_po_head, stride_po_part, stride_pm_req, stride_pm_head,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, PARTITION: tl.constexpr, MAX_SEGMENTS: tl.constexpr,
    PRECISION: tl.constexpr, HAS_SHARED: tl.constexpr, MODE: tl.constexpr,
):
    """decode_partition_kernel without shared prefixes, its tile step by MODE."""
    req, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + req)
    if tl.load(query_start_loc_ptr + req + 1) - q_start != 1:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    seg_len = segment_len(seq_len, PARTITION, MAX_SEGMENTS, TILE_N)
    num_segs = tl.cdiv(seq_len, seg_len)
    if split >= num_segs:
        return
    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_PAD)
    row_ok, dim_ok = rows < GROUP, dims < HEAD_DIM
    q_head = kv_head * GROUP + rows
    q = tl.load(q_ptr + q_start.to(tl.int64) * stride_q_tok + q_head[:, None] * stride_q_head + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if MODE == 1 or MODE == 2 or MODE == 4:
        q = q.to(tl.float16)
    if MODE == 3:
        q = q.to(tl.float32)
    if MODE == 2:
        scale_log2 = scale_log2 * 256.0
        v_scale = v_scale * 256.0
    table = block_tables_ptr + req.to(tl.int64) * stride_bt
    out_base = req.to(tl.int64) * stride_po_req + q_head * stride_po_head
    stat_base = req.to(tl.int64) * stride_pm_req + q_head * stride_pm_head
    for seg in range(split, num_segs, num_splits):
        kv_start = seg * seg_len
        kv_end = tl.minimum(kv_start + seg_len, seq_len)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        if MODE == 4:
            acc = tl.zeros([HEAD_PAD, BLOCK_M], tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
        for tile_start in range(kv_start, kv_end, TILE_N):
            acc, m_i, l_i = _tile(q, acc, m_i, l_i, tile_start, kv_end, table, kv_head, k_cache_ptr, v_cache_ptr,
                                  dims, dim_ok, scale_log2, stride_c_block, stride_c_slot, stride_c_head,
                                  BLOCK_SIZE, TILE_N, MODE)
        if MODE == 4:
            acc = tl.trans(acc)
        if k_cache_ptr.dtype.element_ty == tl.float8e4nv:
            acc = acc * v_scale
        out_off = out_base + seg * stride_po_part
        tl.store(part_out_ptr + out_off[:, None] + dims[None, :], acc, mask=row_ok[:, None] & dim_ok[None, :])
        tl.store(part_max_ptr + stat_base + seg, m_i, mask=row_ok)
        tl.store(part_sum_ptr + stat_base + seg, l_i, mask=row_ok)


class _WithMode:
    """Stands in for triton_backend.decode_partition_kernel: the same launch, plus MODE (and, for MODE 3, the
    group's own row count and a tile config)."""

    def __init__(self, mode: int, tile_n: int | None = None, num_warps: int | None = None):
        self.mode, self.tile_n, self.num_warps = mode, tile_n, num_warps

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if self.mode == 3:
                kwargs["BLOCK_M"] = triton.next_power_of_2(kwargs["GROUP"])
            if self.tile_n:
                kwargs["TILE_N"] = self.tile_n
            if self.num_warps:
                kwargs["num_warps"] = self.num_warps
            _decode_partition[grid](*args, MODE=self.mode, **kwargs)
        return launch


def shapes(rng):
    yield "W1 decode 256 x U(100,2000)", [(rng.randint(100, 2000), 1) for _ in range(256)]
    yield "long decode 4 x 32k", [(32768, 1)] * 4
    yield "W4 decode 32 x 30k", [(30000, 1)] * 32
    yield "W1 decode 32 x U(100,2000)", [(rng.randint(100, 2000), 1) for _ in range(32)]


def main():
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    rng = random.Random(0)
    hq, hkv, d = 16, 8, 128                    # Qwen3-0.6B heads
    scale = d ** -0.5
    variants = [("fp8 MODE 0 (shipped path, own kernel)", 0, None, None), ("fp8 MODE 1 fp16 cvt", 1, None, None),
                ("fp8 MODE 2 fp16 bits", 2, None, None), ("fp8 MODE 3 fma tile 32", 3, 32, 4),
                ("fp8 MODE 3 fma tile 64 w8", 3, 64, 8), ("fp8 MODE 1 tile 128 w8", 1, 128, 8),
                ("fp8 MODE 4 swapped (64, 4)", 4, 64, 4), ("fp8 MODE 4 swapped (128, 4)", 4, 128, 4),
                ("fp8 MODE 4 swapped (128, 8)", 4, 128, 8)]
    shipped = triton_backend.decode_partition_kernel
    for name, rows in shapes(rng):
        batch = make_batch(rows, hq, hkv, d, 16, torch.bfloat16, "cuda", seed=0)
        triton_backend.write_kv(batch.kv_cache, batch.k, batch.v, batch.meta.slot_mapping)
        fp8 = dataclasses.replace(batch, kv_cache=batch.kv_cache.float().clamp(-448, 448).to(torch.float8_e4m3fn))
        ref = torch_backend.paged_attention(batch.q, fp8.kv_cache.to(torch.bfloat16), batch.ref_meta, scale)
        ctx = sum(s for s, _ in rows)
        print(f"\n{name}: {ctx} context tokens")

        def timed(label, b):
            fn = lambda: triton_backend.paged_attention(b.q, b.kv_cache, b.meta, scale)  # noqa: E731
            err = rel_error(fn(), ref) if b.kv_cache.dtype != torch.bfloat16 else float("nan")
            ms = do_bench(fn, return_mode="median")
            gbs = ctx * hkv * d * 2 * b.kv_cache.dtype.itemsize / ms / 1e6
            print(f"  {label:40s} {ms * 1e3:8.1f} us {gbs:8.1f} GB/s  rel err vs dequantized ref {err:.2e}",
                  flush=True)
        timed("bf16 cache (shipped)", batch)
        timed("fp8 cache (shipped)", fp8)
        for label, mode, tile_n, warps in variants:
            triton_backend.decode_partition_kernel = _WithMode(mode, tile_n, warps)
            try:
                timed(label, fp8)
            except Exception as e:   # a variant that does not compile here: say so and go on
                print(f"  {label:40s} failed: {type(e).__name__}: {str(e)[:200]}")
            finally:
                triton_backend.decode_partition_kernel = shipped


if __name__ == "__main__":
    main()
