"""Linear layers of a few rows (decode at batch 1, a speculative verify of k+1 rows) in one launch with what
surrounds them: optionally the RMSNorm before (with its residual add) and the SiLU-and-mul after.

At a few rows a decoder layer's kernels each read little and wait on launch and ramp-up: a batch-1 pass of the
Qwen3-0.6B shape took ~1.5 ms on an H200 for 0.25 ms of weights (issue 16). Folding the two norms and the
activation into the projections' kernels takes a layer's launches besides attention's from seven to four.

    out = W @ norm(x + residual)          (NORM; RESIDUAL: the sum is also stored, by the first program)
    out = silu(W_gate @ h) * (W_up @ h)   (SILU: W is [gate; up] stacked, out has half its rows)

Every program reads the rows' whole x (a few KB) to compute their norms itself, then its BLOCK_N output
columns over all of K: no split-K, so sums are deterministic. Rounding follows the unfused kernels (rms_norm,
silu_and_mul): the residual sum, the normed x and weight * normed rounded to the activations' dtype, the GEMM
accumulated in float32 and rounded, silu rounded before the product.
"""
import torch
import triton
import triton.language as tl

MAX_ROWS = 16   # one tl.dot tile of rows


@triton.jit
def _x_tile(x_ptr, res_ptr, res_out_ptr, norm_w_ptr, rstd, rm, rk, M, K, write_res,
            NORM: tl.constexpr, RESIDUAL: tl.constexpr):
    """x[:, rk] as the linear layer's input: (x + residual), normed and weighted, in x's dtype."""
    mask = (rm[:, None] < M) & (rk[None, :] < K)
    offs = rm[:, None] * K + rk[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if RESIDUAL:
        x = (x.to(tl.float32) + tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
        if write_res:
            tl.store(res_out_ptr + offs, x, mask=mask)
    if NORM:
        normed = (x.to(tl.float32) * rstd[:, None]).to(x.dtype)
        w = tl.load(norm_w_ptr + rk, mask=rk < K, other=0.0)
        x = (w[None, :].to(tl.float32) * normed.to(tl.float32)).to(x.dtype)
    return x


@triton.jit
def small_m_linear_kernel(x_ptr, res_ptr, norm_w_ptr, res_out_ptr, w_ptr, out_ptr, M, N, K, eps,
                          NORM: tl.constexpr, RESIDUAL: tl.constexpr, SILU: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          PRECISION: tl.constexpr):
    """out (M, N) = x (M, K) @ w.T; w is (N, K), or (2N, K) gate then up with SILU."""
    pid = tl.program_id(0)
    rm = tl.arange(0, BLOCK_M)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    write_res = pid == 0
    rstd = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if NORM:
        sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = _x_tile(x_ptr, res_ptr, res_out_ptr, norm_w_ptr, rstd, rm, k0 + tl.arange(0, BLOCK_K), M, K,
                        False, False, RESIDUAL).to(tl.float32)
            sq += tl.sum(x * x, axis=1)
        rstd = 1.0 / tl.sqrt_rn(sq / K + eps)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_mask_n = rn[:, None] < N
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = _x_tile(x_ptr, res_ptr, res_out_ptr, norm_w_ptr, rstd, rm, rk, M, K, write_res, NORM, RESIDUAL)
        w_mask = w_mask_n & (rk[None, :] < K)
        w = tl.load(w_ptr + rn[:, None].to(tl.int64) * K + rk[None, :], mask=w_mask, other=0.0)
        acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
        if SILU:
            w_up = tl.load(w_ptr + (rn[:, None] + N).to(tl.int64) * K + rk[None, :], mask=w_mask, other=0.0)
            acc_up += tl.dot(x, tl.trans(w_up), input_precision=PRECISION)
    out_ty = out_ptr.dtype.element_ty
    if SILU:
        gate = acc.to(out_ty).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(out_ty)
        acc = silu.to(tl.float32) * acc_up.to(out_ty).to(tl.float32)
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc.to(out_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def small_m_linear(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None = None,
                   eps: float = 0.0, residual: torch.Tensor | None = None, silu: bool = False,
                   tile: tuple[int, int, int, int] = (32, 256, 4, 3)):
    """x (M, K) contiguous, M <= MAX_ROWS; weight (N, K), or (2N, K) with silu. Returns out (M, N), and with
    residual also x + residual (the next layer's residual). norm_weight: RMSNorm x (after the add) first.
    tile: (BLOCK_N, BLOCK_K, warps, stages)."""
    x = x.contiguous()
    residual = residual.contiguous() if residual is not None else None
    m, k = x.shape
    if m > MAX_ROWS or weight.shape[1] != k:
        raise ValueError(f"small_m_linear: x {tuple(x.shape)} against weight {tuple(weight.shape)}: at most "
                         f"{MAX_ROWS} rows of its in-features")
    n = weight.shape[0] // 2 if silu else weight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(x) if residual is not None else out
    block_n, block_k, warps, stages = tile
    if x.element_size() == 4:   # float32: half the K tile, the shared memory of a half dtype's stages
        block_k //= 2
    small_m_linear_kernel[(triton.cdiv(n, block_n),)](
        x, residual if residual is not None else x, norm_weight if norm_weight is not None else x, res_out, weight,
        out, m, n, k, eps, NORM=norm_weight is not None, RESIDUAL=residual is not None, SILU=silu,
        BLOCK_M=MAX_ROWS, BLOCK_N=block_n, BLOCK_K=block_k,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",   # float32 exact, not TF32
        num_warps=warps, num_stages=stages)
    return out if residual is None else (out, res_out)
