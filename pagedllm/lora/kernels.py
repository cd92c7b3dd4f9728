"""Batched LoRA products of a step (Triton, CUDA only; imported lazily), the split path: two launches a layer.
lora/ops.py takes it for ranks above 64 or with PAGEDLLM_LORA_KERNEL=split; else the one-launch kernel of
lora/fused.py, which reuses this file's tile helpers. y[i] += (x[i] A[s]^T) B[s]^T for every token i whose slot
s >= 0. Tokens of slot -1 (base rows, graph padding) are neither read nor written, so their
rows of y stay exactly the base layer's output.

Tokens are visited in slot order: `order` holds the token indices sorted by slot and `sorted_slots` their slots,
built on the host with the step (lora/layers.py, sort_by_slot): each adapter's run starts at a multiple of
BLOCK_M, so a tile of BLOCK_M consecutive entries holds one adapter (Punica's SGMV segments, found by the kernel
itself); the gaps and the tail are slot -1. Each program loops over the distinct slots of its tile (a loop on
device data: any order is served, tiles of one slot are just the fast case) and multiplies only that slot's
rows; a tile of padding exits after reading BLOCK_M slot ids. So the grid depends on the list's length alone
(tiles x column tiles x splits or shards) and one captured CUDA graph per T serves any mix of adapters. Decode
rows of one adapter are scattered in the batch, but sorted they are one segment too: the adapter's A and B are
read once a tile, not once a token.

shrink: t = x A^T over K in SPLIT parts, each its own (T, N) float32 partial (N = shards x R): decode steps have
few tiles, and splitting K gives the GPU enough programs without atomics. expand sums the parts in order, rounds
t to the adapter's dtype (as x A^T in that dtype would be) and adds t_i B_i^T to shard i's columns only, reading
only shard i's R rank columns (B is block-diagonal: its other columns are zeros). Block sizes and splits depend
on the layer's shapes, never on T: a token's result is the same in any batch (graphs and eager steps agree).
"""
import torch
import triton
import triton.language as tl

from pagedllm.lora.layers import SEGMENT

BLOCK_M = SEGMENT    # tokens a tile: decode steps have few tokens of an adapter; an adapter's run starts a tile
SHRINK_BLOCK_K = 128
K_PER_SPLIT = 256    # a shrink program's share of K (unrolled in BLOCK_K steps; expand sums the K / 256 parts)
EXPAND_BLOCK_N = 64
NO_SLOT: tl.constexpr = tl.constexpr(1 << 30)


@triton.jit
def _tile(order_ptr, slots_ptr, n_sorted, BLOCK_M: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_range = rows < n_sorted
    slots = tl.load(slots_ptr + rows, mask=in_range, other=-1)
    tokens = tl.load(order_ptr + rows, mask=in_range, other=0).to(tl.int64)
    return tokens, slots


@triton.jit
def _next_slot(slots, after):
    """The smallest slot of the tile above `after`; NO_SLOT when none."""
    return tl.min(tl.where(slots > after, slots, NO_SLOT), axis=0)


@triton.jit
def lora_shrink_kernel(x_ptr, a_ptr, t_ptr, order_ptr, slots_ptr, n_sorted, K, N,
                       stride_xm, stride_as, stride_an, stride_ts, stride_tm,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       K_PER_SPLIT: tl.constexpr, PRECISION: tl.constexpr):
    tokens, slots = _tile(order_ptr, slots_ptr, n_sorted, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    split = tl.program_id(2)
    k_lo = split * K_PER_SPLIT
    out_ptrs = t_ptr + split * stride_ts + tokens[:, None] * stride_tm + cols[None, :]
    s = _next_slot(slots, -1)
    while s < NO_SLOT:
        hit = slots == s
        a_ptrs = a_ptr + s.to(tl.int64) * stride_as + cols[None, :] * stride_an
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in tl.static_range(0, K_PER_SPLIT, BLOCK_K):   # unrolled: the loads of a split issue together
            ks = k_lo + k + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            x = tl.load(x_ptr + tokens[:, None] * stride_xm + ks[None, :], mask=hit[:, None] & k_ok[None, :],
                        other=0.0)
            a = tl.load(a_ptrs + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)   # (BLOCK_K, BLOCK_N)
            acc = tl.dot(x.to(a.dtype), a, acc, input_precision=PRECISION)
        tl.store(out_ptrs, acc, mask=hit[:, None] & col_ok[None, :])
        s = _next_slot(slots, s)


@triton.jit
def lora_expand_kernel(t_ptr, b_ptr, y_ptr, order_ptr, slots_ptr, bounds_ptr, n_sorted,
                       stride_ts, stride_tm, stride_tslot, stride_bs, stride_bo, stride_ym,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, R: tl.constexpr,
                       NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr):
    shard = tl.program_id(2)
    lo = tl.load(bounds_ptr + shard)
    hi = tl.load(bounds_ptr + shard + 1)
    first_col = lo + tl.program_id(1) * BLOCK_N
    if first_col < hi:   # the grid's column tiles cover the largest shard
        tokens, slots = _tile(order_ptr, slots_ptr, n_sorted, BLOCK_M)
        cols = first_col + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        y_ptrs = y_ptr + tokens[:, None] * stride_ym + cols[None, :]
        s = _next_slot(slots, -1)
        while s < NO_SLOT:
            hit = slots == s
            b_ptrs = b_ptr + s.to(tl.int64) * stride_bs + cols[None, :] * stride_bo
            t_slot = t_ptr + s.to(tl.int64) * stride_tslot
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for r in tl.static_range(0, R, BLOCK_R):
                ranks = r + tl.arange(0, BLOCK_R)
                r_ok = ranks < R
                rk = shard * R + ranks
                t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                for j in tl.static_range(NUM_SPLITS):
                    t += tl.load(t_slot + j * stride_ts + tokens[:, None] * stride_tm + rk[None, :],
                                 mask=hit[:, None] & r_ok[None, :], other=0.0)
                b = tl.load(b_ptrs + rk[:, None], mask=r_ok[:, None] & col_ok[None, :], other=0.0)   # (R, N) tile
                acc = tl.dot(t.to(b.dtype), b, acc, input_precision=PRECISION)
            mask = hit[:, None] & col_ok[None, :]
            y = tl.load(y_ptrs, mask=mask, other=0.0)
            tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y.dtype), mask=mask)
            s = _next_slot(slots, s)


def _pow2_at_least_16(n: int, cap: int) -> int:
    return min(max(16, triton.next_power_of_2(n)), cap)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"   # float32 adapters: exact float32 products, as torch's


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, order: torch.Tensor, sorted_slots: torch.Tensor
                ) -> torch.Tensor:
    """x (T, K), lora_a (L, N, K) -> partial products (SPLIT, T, N) float32; rows of slot -1 are not written.
    order, sorted_slots: sort_by_slot's list (any length; its entries of slot -1 are skipped)."""
    T, K = x.shape
    N = lora_a.shape[1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    splits = triton.cdiv(K, K_PER_SPLIT)
    t = torch.empty((splits, T, N), dtype=torch.float32, device=x.device)
    block_n = _pow2_at_least_16(N, 64)
    grid = (triton.cdiv(order.shape[0], BLOCK_M), triton.cdiv(N, block_n), splits)
    if T > 0:
        lora_shrink_kernel[grid](x, lora_a, t, order, sorted_slots, order.shape[0], K, N,
                                 x.stride(0), lora_a.stride(0), lora_a.stride(1), t.stride(0), t.stride(1),
                                 BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=SHRINK_BLOCK_K, K_PER_SPLIT=K_PER_SPLIT,
                                 PRECISION=_precision(lora_a.dtype), num_warps=4)
    return t


def lora_expand(y: torch.Tensor, t: torch.Tensor, lora_b: torch.Tensor, order: torch.Tensor,
                sorted_slots: torch.Tensor, shard_bounds: torch.Tensor, max_shard: int, rank: int,
                slot_stride: int = 0) -> torch.Tensor:
    """y (T, out) += each shard's t[:, i*R:(i+1)*R] @ lora_b[s, rows of shard i, i*R:(i+1)*R]^T, in place.
    shard_bounds (n + 1,) int32 on the device: the shards' first output columns, then out; max_shard: the
    largest shard's width (host int, sizes the grid). slot_stride: columns between the slots' t, when each slot
    has its own (x times every slot's A rows, as one GEMM beside the base layer's would give: lora_kernels.py
    --wide-gemm); 0: one t whose rows hold their own slot's product (the shrink's)."""
    T = y.shape[0]
    assert y.stride(-1) == 1 and t.shape[1] == T, "lora_expand: y must have unit column stride, t T rows"
    num_shards = shard_bounds.numel() - 1
    grid = (triton.cdiv(order.shape[0], BLOCK_M), triton.cdiv(max_shard, EXPAND_BLOCK_N), num_shards)
    if T > 0:
        lora_expand_kernel[grid](t, lora_b, y, order, sorted_slots, shard_bounds, order.shape[0],
                                 t.stride(0), t.stride(1), slot_stride, lora_b.stride(0), lora_b.stride(1), y.stride(0),
                                 BLOCK_M=BLOCK_M, BLOCK_N=EXPAND_BLOCK_N, BLOCK_R=_pow2_at_least_16(rank, 64),
                                 R=rank, NUM_SPLITS=t.shape[0], PRECISION=_precision(lora_b.dtype), num_warps=4)
    return y


def add_lora(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, order: torch.Tensor,
             sorted_slots: torch.Tensor, shard_bounds: torch.Tensor, max_shard: int, rank: int) -> torch.Tensor:
    """y += LoRA(x) for the tokens with a slot, in place: two launches, no host sync."""
    t = lora_shrink(x, lora_a, order, sorted_slots)
    return lora_expand(y, t, lora_b, order, sorted_slots, shard_bounds, max_shard, rank)
