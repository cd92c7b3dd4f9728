"""Long prompt rows through FlashAttention-4's Hopper kernel (the flash-attn-4 package, written in the CuTe DSL).
cudnn_prefill routes the rows (the same rows, thresholds and eager steps) and gathers their K/V; this module only
attends them, where the package is installed (`pip install pagedllm[fa4]`), instead of cuDNN.

Why: W4-prefill spent ~70% of its GPU time in cuDNN's attention at 520-580 TFLOP/s. FA4 carries FA3's Hopper
kernel (TMA loads, warp-specialized producer and consumers, ping-pong softmax) over to the CuTe DSL.
Measured on an H100 (session 43, benchmarks/prefill_long.py, bf16): one layer of W4's chunks 203 ms (580 TFLOP/s)
against cuDNN's 233 (507); W4-prefill 7.70 s against 8.51, W4 17.35 against 18.23. Two variants lost and are
gone: FA4 reading the paged cache through its page_table (215 ms, W4-prefill 7.95 s: 16-token pages load with
cp.async, not TMA) and GQA heads unpacked (200 ms, the same within noise).

The call is causal from the bottom right (FlashAttention's convention when keys outnumber queries: new token j
sees the row's cached keys and new keys 0..j), as cuDNN's. An fp8 cache's rows come widened to q's dtype (FA4
reads fp8 on Blackwell only). It goes through flash_attn.cute.interface._flash_attn_fwd, which writes into the
row's out (the public flash_attn_varlen_func allocates its own). Written against flash-attn-4 4.0.0b40 (a beta:
its internals move, hence the pin in the extra). Each variant (dtype, heads, head dim) compiles at its first call
(~3 s); prebuild() makes that call at start-up, and lengths compile nothing new. Importing the package takes
~10 s on the H100 machine, paid at start-up only by engines whose limits let a row reach this path.
"""
import functools
import logging

import torch

logger = logging.getLogger("pagedllm")


@functools.cache
def interface():
    """flash_attn.cute.interface, or None where flash-attn-4 is not installed (or does not import)."""
    try:
        from flash_attn.cute import interface as fa4
    except ModuleNotFoundError:
        return None               # not installed: cuDNN's kernel, nothing to say
    except Exception as e:        # installed but broken, e.g. the CuTe DSL finding no CUDA toolkit it can run
        logger.warning("FlashAttention-4 prefill off: flash_attn.cute does not import (%s)", str(e)[:200])
        return None
    return fa4


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, cu_q: torch.Tensor,
           cu_k: torch.Tensor, scale: float) -> None:
    """out (L, Hq, D) = causal (bottom-right) attention of q (L, Hq, D) over k, v (S, Hkv, D), all contiguous;
    cu_q = [0, L], cu_k = [0, S] int32 on the device."""
    interface()._flash_attn_fwd(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=q.shape[0],
                                max_seqlen_k=k.shape[0], softmax_scale=scale, causal=True, out=out)


def prebuild(num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
    """Compiles the kernel for these heads with one small call."""
    n = 256
    q = torch.zeros(n, num_q_heads, head_dim, dtype=dtype, device=device)
    kv = torch.zeros(n, num_kv_heads, head_dim, dtype=dtype, device=device)
    cu = torch.tensor([0, n], dtype=torch.int32, device=device)
    attend(q, kv, kv, torch.empty_like(q), cu, cu, head_dim ** -0.5)
    torch.cuda.synchronize(device)
