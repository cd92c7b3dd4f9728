"""One launch a LoRA layer for ranks <= 64 (Triton, CUDA only; imported lazily): shrink and expand fused.

The two-launch path (lora/kernels.py) costs two dependent kernels a module, 224 a Qwen3-0.6B step, each latency
bound (a few KB of work). Here a program owns an output tile (BLOCK_M tokens x BLOCK_N columns of one shard):
it recomputes its tokens' t = x A_shard^T over all of K (rank <= 64: a (BLOCK_M, R) float32 accumulator),
rounds t to the adapter's dtype as the two-launch path does, and adds t B_shard^T into y, in place. Its B and y
tiles are loaded before the K loop, so their latency hides behind it. Recomputing t per column tile reads x
and A again from L2: wide BLOCK_N keeps that small, and when a step needs more programs than the GPU runs at
once (PROGRAMS), programs take several column tiles each, computing t once for them, in one wave.

Tokens come sorted by slot, each adapter's run from a multiple of 16 tokens (lora/layers.py, sort_by_slot), so
a tile of the default 16 rows holds one adapter (a wider tile loops over its adapters, one K loop each). The
grid depends on the sorted list's length (T and the number of slots) only; block sizes depend on the layer's
shapes only, so a token's result is the same in any batch (graphs and eager steps agree), and base tokens
(slot -1) are neither read nor written.
"""
import functools
import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from pagedllm.lora.kernels import NO_SLOT, _next_slot, _pow2_at_least_16, _precision, _tile

FUSED_MAX_RANK = 64
# Programs with columns above which each takes several column tiles: 2 an SM of an H200's 132, between what ran
# as one wave and what did not. H200, a 256-token decode step over 8 adapters (benchmarks/lora_kernels.py):
# gate_up, 384 programs, 12.66 us at one column tile a program, 8.05 at 3; qkv, 256, 7.17 at one, 8.04 at 3
PROGRAMS = 264
# ... and for layers whose K loop is long (in_features >= 2048: o and down), where recomputing t for each column
# tile costs more than the programs it spreads over: H200, a 232-token decode step over 8 adapters (W1's), o
# 9.05 -> 7.12 us, down 11.92 -> 9.16; 2,048-token prefill o 11.54 -> 11.07, down 14.46 -> 13.19; the short-K
# layers lose at 64 (qkv 8.50 -> 10.68, gate_up 9.30 -> 13.50 at 232 tokens)
LONG_K, LONG_K_PROGRAMS = 2048, 64
CONFIG_ENV = "PAGEDLLM_LORA_FUSED_CONFIG"   # "block_m,block_n,block_k,num_warps,num_stages" for every layer


@dataclass(frozen=True)
class FusedConfig:
    block_m: int = 16
    block_n: int = 128
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3

    @classmethod
    def parse(cls, text: str) -> "FusedConfig":
        try:
            cfg = cls(*(int(v) for v in text.split(",")))
        except (TypeError, ValueError):
            raise ValueError(f"{CONFIG_ENV} must be 5 integers block_m,block_n,block_k,num_warps,num_stages, "
                             f"got {text!r}") from None
        pow2 = all(v >= 16 and v & (v - 1) == 0 for v in (cfg.block_m, cfg.block_n, cfg.block_k))
        if not pow2 or cfg.num_warps not in (1, 2, 4, 8, 16) or not 1 <= cfg.num_stages <= 6:
            raise ValueError(f"{CONFIG_ENV}: blocks must be powers of two >= 16, num_warps 1..16 (a power of two), "
                             f"num_stages 1..6; got {text!r}")
        return cfg


SMEM_BUDGET = 200 * 1024   # bytes of shared memory a program may take (sm_90 allows 227 KB; a margin)


def shared_memory_bytes(cfg: FusedConfig, block_r: int, elem_size: int) -> int:
    """A bound on what Triton allocates for the kernel: the x and A tiles of the K loop's stages in flight (stages
    - 1 buffers) and the B tile. Triton 3.6 took exactly this for float32 at rank 64 on the H200 (282,624 bytes at
    256-wide K steps); Triton 3.9 takes less at 128-wide steps (126,976 of 159,744)."""
    return ((cfg.num_stages - 1) * (cfg.block_m + block_r) * cfg.block_k + block_r * cfg.block_n) * elem_size + 4096


@functools.lru_cache(maxsize=None)   # eager steps call it per layer: read the environment once a shape
def layer_config(in_features: int, max_shard: int, rank: int, elem_size: int = 2) -> FusedConfig:
    """By the layer's shapes and dtype only (never T). Wide column tiles where shards are wide (fewer recomputed
    x A) and the rank small (a rank-64 B tile that wide spills registers); the K loop is a program's critical path:
    fewer, wider steps where K is long (o, down), 4 stages in flight. No 16-bit tile here spills on sm_90 (ptxas
    -v); float32 at a high rank would pass the shared memory limit, so its K steps, then its stages, shrink."""
    override = os.environ.get(CONFIG_ENV)
    if override:
        return FusedConfig.parse(override)
    block_k = 256 if in_features >= 2048 else _pow2_at_least_16(in_features, 128)
    cfg = FusedConfig(block_n=256 if max_shard >= 2048 and rank <= 32 else 128, block_k=block_k, num_stages=4)
    block_r = _pow2_at_least_16(rank, FUSED_MAX_RANK)
    while shared_memory_bytes(cfg, block_r, elem_size) > SMEM_BUDGET:
        if cfg.block_k > 64:
            cfg = replace(cfg, block_k=cfg.block_k // 2)
        elif cfg.num_stages > 2:
            cfg = replace(cfg, num_stages=cfg.num_stages - 1)
        else:
            break
    return cfg


def column_tiles_per_program(live: int, col_tiles: int, programs: int = PROGRAMS) -> int:
    """1 while the programs with columns to write (`live`) fit in one wave (more programs, each recomputing t);
    above it each takes several column tiles, so x A is computed fewer times (once a shard at the widest)."""
    return max(1, min(col_tiles, triton.cdiv(live, programs)))


@triton.jit(do_not_specialize=["n_sorted", "n_tiles"])   # one compile a layer and dtype, whatever the step
def lora_fused_kernel(x_ptr, a_ptr, b_ptr, y_ptr, order_ptr, slots_ptr, bounds_ptr, n_sorted, K, n_tiles,
                      stride_xm, stride_as, stride_an, stride_bs, stride_bo, stride_ym,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                      R: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
    tokens, slots = _tile(order_ptr, slots_ptr, n_sorted, BLOCK_M)   # beside the bounds' loads, not after them
    shard = tl.program_id(2)
    lo = tl.load(bounds_ptr + shard)
    hi = tl.load(bounds_ptr + shard + 1)
    first_col = lo + tl.program_id(1) * n_tiles * BLOCK_N
    if first_col < hi:   # the grid's column tiles cover the largest shard
        end = tl.minimum(hi, first_col + n_tiles * BLOCK_N)   # this program's columns: first_col..end
        s = _next_slot(slots, -1)
        ranks = tl.arange(0, BLOCK_R)
        r_ok = ranks < R
        rk = shard * R + ranks
        x_ptrs = x_ptr + tokens[:, None] * stride_xm
        while s < NO_SLOT:
            hit = slots == s
            s64 = s.to(tl.int64)
            b_ptrs = b_ptr + s64 * stride_bs + rk[:, None]
            cols = first_col + tl.arange(0, BLOCK_N)
            col_ok = cols < end
            # the first column tile's B and y, loaded before the K loop: their latency hides behind it
            b = tl.load(b_ptrs + cols[None, :] * stride_bo, mask=r_ok[:, None] & col_ok[None, :], other=0.0)
            y = tl.load(y_ptr + tokens[:, None] * stride_ym + cols[None, :], mask=hit[:, None] & col_ok[None, :],
                        other=0.0)
            a_ptrs = a_ptr + s64 * stride_as + rk[None, :] * stride_an
            t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for k in range(0, K, BLOCK_K):
                ks = k + tl.arange(0, BLOCK_K)
                if EVEN_K:
                    x = tl.load(x_ptrs + ks[None, :], mask=hit[:, None], other=0.0)
                    a = tl.load(a_ptrs + ks[:, None], mask=r_ok[None, :], other=0.0)   # (BLOCK_K, BLOCK_R)
                else:
                    k_ok = ks < K
                    x = tl.load(x_ptrs + ks[None, :], mask=hit[:, None] & k_ok[None, :], other=0.0)
                    a = tl.load(a_ptrs + ks[:, None], mask=k_ok[:, None] & r_ok[None, :], other=0.0)
                t = tl.dot(x.to(a.dtype), a, t, input_precision=PRECISION)
            t = t.to(b.dtype)   # rounded as x A^T in the adapter's dtype would be
            tl.store(y_ptr + tokens[:, None] * stride_ym + cols[None, :],
                     (y.to(tl.float32) + tl.dot(t, b, input_precision=PRECISION)).to(y.dtype),
                     mask=hit[:, None] & col_ok[None, :])
            for _ in tl.range(1, n_tiles, num_stages=1):   # a large step's: its other column tiles, t reused
                cols += BLOCK_N
                col_ok = cols < end
                b = tl.load(b_ptrs + cols[None, :] * stride_bo, mask=r_ok[:, None] & col_ok[None, :], other=0.0)
                y_ptrs = y_ptr + tokens[:, None] * stride_ym + cols[None, :]
                mask = hit[:, None] & col_ok[None, :]
                y = tl.load(y_ptrs, mask=mask, other=0.0)
                acc = tl.dot(t, b, input_precision=PRECISION)
                tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y.dtype), mask=mask)
            s = _next_slot(slots, s)


def lora_fused(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, order: torch.Tensor,
               sorted_slots: torch.Tensor, shard_bounds: torch.Tensor, max_shard: int, rank: int,
               config: FusedConfig | None = None, programs: int | None = None) -> torch.Tensor:
    """add_lora's contract (lora/kernels.py) in one launch; rank <= FUSED_MAX_RANK. programs: the programs
    above which each takes several column tiles (default by K; tests: small, to take that path on small inputs).
    Neither it nor block_n changes a result: each column's t is the same K loop."""
    T, K = x.shape
    assert rank <= FUSED_MAX_RANK, f"lora_fused: rank {rank} > {FUSED_MAX_RANK}"
    assert y.stride(-1) == 1 and y.shape[0] == T, "lora_fused: y must have unit column stride and T rows"
    if x.stride(-1) != 1:
        x = x.contiguous()
    cfg = config or layer_config(K, max_shard, rank, lora_a.element_size())
    n_sorted = order.shape[0]
    num_shards, col_tiles = shard_bounds.numel() - 1, triton.cdiv(max_shard, cfg.block_n)
    # programs with columns: about T's tiles (the sorted list's padding tiles exit at once), and the grid
    # covers the widest shard (narrower shards' extra column tiles exit at once too)
    live = triton.cdiv(T, cfg.block_m) * triton.cdiv(y.shape[1], cfg.block_n)
    programs = programs or (LONG_K_PROGRAMS if K >= LONG_K else PROGRAMS)
    n_tiles = column_tiles_per_program(live, col_tiles, programs)
    grid = (triton.cdiv(n_sorted, cfg.block_m), triton.cdiv(col_tiles, n_tiles), num_shards)
    if T > 0:
        lora_fused_kernel[grid](x, lora_a, lora_b, y, order, sorted_slots, shard_bounds, n_sorted, K, n_tiles,
                                x.stride(0), lora_a.stride(0), lora_a.stride(1), lora_b.stride(0), lora_b.stride(1),
                                y.stride(0), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                                BLOCK_R=_pow2_at_least_16(rank, FUSED_MAX_RANK), R=rank,
                                EVEN_K=K % cfg.block_k == 0, PRECISION=_precision(lora_a.dtype),
                                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y
