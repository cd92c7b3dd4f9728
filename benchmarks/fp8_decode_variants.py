"""An fp8 KV cache's decode attention: the shipped split-KV kernel against a variant, on the same shapes, beside
the bf16 cache (issue 18). The shipped tile widens fp8 K/V to fp16 and runs q K^T and p V with the 16 padded
query rows of a kv head as the dots' M side; on the H200 it reads fp8 at ~2.3 TB/s (bf16: ~4.2), its pace set by
each tile's chain of load, conversion and dots, not by bytes.

The variant, `swapped`: s^T = K q^T and acc^T = V^T p^T, so the keys (TILE_N >= 64) and the head dims are the dots'
M side, where Hopper's wgmma can take them, and the padded query rows the N side. H200 at 668da6d (us): on W1's
32 short rows 78.6 at (64, 4) against 154.3 shipped (bf16 cache 157.9); on W4's 32 x 30k 1,340 against 855 (bf16
910); its (128, 4) tile was wrong on W4 (rel err 3.9e-2), (128, 8) right. Its 256-row figures were not kept. Now
also on the bf16 cache (is the gain the swap's, whatever the dtype?), and the shipped kernel at other tiles
(TILE_N, warps, stages: triton_backend._decode_config replaced, so the reduce kernel sees the same tile).

Measured before, with this script at 2122c68 (H200, W1's 256 rows / 32 x 30k, us): fp8 widened to bf16 325.5 /
966.1; to fp16 291.0 / 855.6 (shipped since 31419c4); to fp16 by bit shifts 366.4 / 1,097; no tl.dot (fp32 FMA)
981.9 / 3,206; bf16 cache 291.3 / 910.2.

Each output is checked against the torch reference on the same cache (an fp8 one dequantized). Times: do_bench medians.

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
from pagedllm.attention.kernels.attend_tile import dot_q, load_kv_tile  # noqa: E402
from pagedllm.attention.kernels.decode_partition import segment_len  # noqa: E402


@triton.jit(do_not_specialize=["num_splits"])
def _decode_partition_swapped(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, first_seg_ptr,
    part_out_ptr, part_max_ptr, part_sum_ptr,
    scale_log2, v_scale, num_splits,
    stride_q_tok, stride_q_head, stride_bt,
    stride_c_block, stride_c_slot, stride_c_head,
    stride_po_req, stride_po_head, stride_po_part, stride_pm_req, stride_pm_head,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, PARTITION: tl.constexpr, MAX_SEGMENTS: tl.constexpr,
    PRECISION: tl.constexpr, HAS_SHARED: tl.constexpr,
):
    """decode_partition_kernel's contract (no shared prefixes), its dots swapped: acc is (HEAD_PAD, BLOCK_M)."""
    req, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + req)
    if tl.load(query_start_loc_ptr + req + 1) - q_start != 1:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    seg_len = segment_len(seq_len, PARTITION, MAX_SEGMENTS, TILE_N)
    num_segs = tl.cdiv(seq_len, seg_len)
    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_PAD)
    row_ok, dim_ok = rows < GROUP, dims < HEAD_DIM
    q_head = kv_head * GROUP + rows
    q = tl.load(q_ptr + q_start.to(tl.int64) * stride_q_tok + q_head[:, None] * stride_q_head + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    q = dot_q(q, k_cache_ptr)
    table = block_tables_ptr + req.to(tl.int64) * stride_bt
    out_base = req.to(tl.int64) * stride_po_req + q_head * stride_po_head
    stat_base = req.to(tl.int64) * stride_pm_req + q_head * stride_pm_head
    for seg in range(split, num_segs, num_splits):
        kv_end = tl.minimum(seg * seg_len + seg_len, seq_len)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([HEAD_PAD, BLOCK_M], tl.float32)
        for tile_start in range(seg * seg_len, kv_end, TILE_N):
            keys, key_ok, k, v = load_kv_tile(q, tile_start, kv_end, table, kv_head, k_cache_ptr, v_cache_ptr,
                                              dims, dim_ok, stride_c_block, stride_c_slot, stride_c_head,
                                              BLOCK_SIZE, TILE_N)
            st = tl.where(key_ok[:, None], tl.dot(k, tl.trans(q)) * scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(st, axis=0))
            pt = tl.math.exp2(st - m_new[None, :])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(pt, axis=0)
            acc = acc * alpha[None, :] + tl.dot(tl.trans(v), pt.to(v.dtype))
            m_i = m_new
        acc = tl.trans(acc)
        if k_cache_ptr.dtype.element_ty == tl.float8e4nv:
            acc = acc * v_scale
        out_off = out_base + seg * stride_po_part
        tl.store(part_out_ptr + out_off[:, None] + dims[None, :], acc, mask=row_ok[:, None] & dim_ok[None, :])
        tl.store(part_max_ptr + stat_base + seg, m_i, mask=row_ok)
        tl.store(part_sum_ptr + stat_base + seg, l_i, mask=row_ok)


class _Swapped:
    """Stands in for triton_backend.decode_partition_kernel: the same launch, at a tile config of its own."""

    def __init__(self, tile_n: int, num_warps: int):
        self.tile_n, self.num_warps = tile_n, num_warps

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            _decode_partition_swapped[grid](*args, **{**kwargs, "TILE_N": self.tile_n, "num_warps": self.num_warps})
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
    swapped = [("swapped (64, 4)", 64, 4), ("swapped (128, 8)", 128, 8)]
    tiles = [(128, 4, 2), (128, 8, 2), (64, 4, 3), (64, 8, 3), (32, 4, 3)]
    for name, rows in shapes(rng):
        batch = make_batch(rows, hq, hkv, d, 16, torch.bfloat16, "cuda", seed=0)
        triton_backend.write_kv(batch.kv_cache, batch.k, batch.v, batch.meta.slot_mapping)
        fp8 = dataclasses.replace(batch, kv_cache=batch.kv_cache.float().clamp(-448, 448).to(torch.float8_e4m3fn))
        ref = torch_backend.paged_attention(batch.q, fp8.kv_cache.to(torch.bfloat16), batch.ref_meta, scale)
        ref_bf16 = torch_backend.paged_attention(batch.q, batch.kv_cache, batch.ref_meta, scale)
        ctx = sum(s for s, _ in rows)
        print(f"\n{name}: {ctx} context tokens")

        def timed(label, b):
            fn = lambda: triton_backend.paged_attention(b.q, b.kv_cache, b.meta, scale)  # noqa: E731
            err = rel_error(fn(), ref if b.kv_cache.dtype != torch.bfloat16 else ref_bf16)
            ms = do_bench(fn, return_mode="median")
            gbs = ctx * hkv * d * 2 * b.kv_cache.dtype.itemsize / ms / 1e6
            print(f"  {label:40s} {ms * 1e3:8.1f} us {gbs:8.1f} GB/s  rel err vs the torch reference {err:.2e}",
                  flush=True)
        def timed_with(label, b, name, value):
            """timed() with triton_backend.<name> replaced by value for the run."""
            shipped = getattr(triton_backend, name)
            setattr(triton_backend, name, value)
            try:
                timed(label, b)
            except Exception as e:   # a variant that does not compile here: say so and go on
                print(f"  {label:40s} failed: {type(e).__name__}: {str(e)[:200]}")
            finally:
                setattr(triton_backend, name, shipped)
        timed("bf16 cache (shipped)", batch)
        timed("fp8 cache (shipped)", fp8)
        for label, tile_n, warps in swapped:
            for cache, b in (("fp8", fp8), ("bf16", batch)):
                timed_with(f"{cache} {label}", b, "decode_partition_kernel", _Swapped(tile_n, warps))
        for tile in tiles:
            timed_with(f"fp8 shipped at {tile}", fp8, "_decode_config", lambda dtype, head_dim, tile=tile: tile)


if __name__ == "__main__":
    main()
