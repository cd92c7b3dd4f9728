"""An FP8 GEMM with rowwise scales for decode-sized inputs: out (M, N) = (q (M, K) * s_x) @ (w (N, K) * s_w)^T
(+ bias), float32 accumulation on Hopper's FP8 tensor cores, the scales, bias and rounding in the epilogue.

Why: at a few hundred rows, torch._scaled_mm with rowwise scales runs kernels slower than bf16 cuBLAS (H200,
Qwen3-0.6B at M=256: 0.5-0.9x), while cuBLASLt's per-tensor fp8 kernels run 1.1-1.3x bf16 at the same sizes:
the rowwise scales are cheap, the kernel choice is not. fp8.triton_serves says where this kernel runs; TILE
is the best of benchmarks/fp8_gemm.py's sweep there (H100): small tiles over a long K, many programs.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def fp8_gemm_kernel(q_ptr, w_ptr, sx_ptr, sw_ptr, bias_ptr, out_ptr, M, N, K, stride_q, stride_w, stride_out,
                    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_M: tl.constexpr, IMPRECISE: tl.constexpr):
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    # grouped order: programs that run together share rows of w in L2
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_size = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size)
    pid_n = (pid % (GROUP_M * num_n)) // group_size
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    q_rows = q_ptr + rm[:, None].to(tl.int64) * stride_q + rk[None, :]
    w_rows = w_ptr + rn[:, None].to(tl.int64) * stride_w + rk[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):   # K is a multiple of 16; the last tile is masked
        k_ok = (k0 + rk) < K
        a = tl.load(q_rows + k0, mask=(rm[:, None] < M) & k_ok[None, :], other=0.0)
        b = tl.load(w_rows + k0, mask=(rn[:, None] < N) & k_ok[None, :], other=0.0)
        # each tile's dot from zero, added in float32: Triton's sm90 default lets fp8 MMAs accumulate in their
        # narrower accumulator across all of K (cuBLAS promotes every 128 or so); within a tile at most 128
        acc += tl.dot(a, tl.trans(b), max_num_imprecise_acc=IMPRECISE)
    sx = tl.load(sx_ptr + rm, mask=rm < M, other=0.0)
    sw = tl.load(sw_ptr + rn, mask=rn < N, other=0.0)
    out = acc * (sx[:, None] * sw[None, :])
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * stride_out + rn[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


TILE = (64, 64, 256, 4, 3)   # BLOCK_M, BLOCK_N, BLOCK_K, warps, stages


def fp8_gemm(q: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
             bias: torch.Tensor | None, out_dtype: torch.dtype, tile: tuple[int, ...] | None = None) -> torch.Tensor:
    """q (M, K) fp8 (unit column stride), scale (M, 1) float32, weight (N, K) fp8, weight_scale (N,) float32."""
    m, k = q.shape
    n = weight.shape[0]
    tile = tile or TILE
    out = torch.empty((m, n), dtype=out_dtype, device=q.device)
    if m == 0:
        return out
    block_m, block_n, block_k, warps, stages = tile
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    fp8_gemm_kernel[grid](q, weight, scale.reshape(-1).contiguous(), weight_scale, bias if bias is not None else out,
                          out, m, n, k, q.stride(0), weight.stride(0), out.stride(0), HAS_BIAS=bias is not None,
                          BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, IMPRECISE=min(block_k, 128),
                          num_warps=warps,
                          num_stages=stages)
    return out
