"""Long prompt rows through cuDNN's fused attention (PyTorch's SDPA cuDNN backend): FA3-class speed on Hopper.

H200, bf16, causal, Qwen3-0.6B heads (benchmarks/prefill_long.py): cuDNN 550 / 619 / 575 TFLOP/s at 8k / 16k /
32k tokens, the Triton prefill kernel 324 / 337 / 355 (its paged gathers keep it off TMA and warp-specialized
pipelines). So a row with at least LONG_QUERY_LEN new tokens, in a step that runs eagerly, goes to cuDNN:

    K/V of its seq_len tokens are gathered from the paged cache into contiguous tensors (by whole blocks);
    fresh prompt (no context):  one causal call
    chunk after cached context: the chunk against itself (causal, square) and against the context (no mask),
                                each with its log-sum-exp, merged by merge_states

cuDNN aligns the causal mask top-left, which is right only for the square part; hence two calls. The Triton
prefill kernel skips these rows (it reads the same threshold). Steps inside CUDA graphs keep the Triton kernels
(the routing is a host decision; graphs replay one).

Off unless PAGEDLLM_CUDNN_PREFILL=1. cuDNN builds an execution plan for every new (query, key) shape: 55-70 ms
each on the H200 (1.3 s for the first), and a chunked long prompt brings new shapes nearly every step. W4-prefill
took 12.65 s with this path against 11.60 s without (W4: 20.4 against 18.3), though each call runs at 560-610
TFLOP/s once planned. Shorter rows lose even when planned (host cost per call: fresh 4k prompts 205 TFLOP/s
against the Triton kernel's 310; it wins from 8k fresh, or 2k new tokens after 28k cached). Next: pad queries
and split the context into a few fixed key lengths so that plans repeat.
"""
import functools
import os

import torch
import triton

from pagedllm.attention.kernels.merge_states import merge_states_kernel
from pagedllm.attention.metadata import AttentionMetadata

ENABLED = os.environ.get("PAGEDLLM_CUDNN_PREFILL", "0") == "1"   # read once: threshold() runs every layer
LONG_QUERY_LEN = 1024     # rows with fewer new tokens stay on the Triton kernel (measured: see the module doc)
NEVER = 1 << 30           # the Triton kernel's threshold when no row is routed here


def threshold(q: torch.Tensor, meta: AttentionMetadata) -> int:
    """The query length from which rows of this step go to cuDNN (NEVER: none do)."""
    if meta.max_query_len < LONG_QUERY_LEN or not _usable(q) or torch.cuda.is_current_stream_capturing():
        return NEVER
    return LONG_QUERY_LEN


def attend(q: torch.Tensor, out: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
           long_query_len: int) -> None:
    """Writes out[] for every row with at least long_query_len new tokens."""
    starts, seq_lens = meta.query_start_loc_cpu, meta.seq_lens_cpu
    block_size = kv_cache.shape[2]
    for i, seq_len in enumerate(seq_lens):
        start, end = starts[i], starts[i + 1]
        query_len = end - start
        if query_len < long_query_len:
            continue
        context = seq_len - query_len
        num_blocks = triton.cdiv(seq_len, block_size)
        kv = kv_cache[:, meta.block_tables[i, :num_blocks].long()]       # (2, blocks, block_size, Hkv, D)
        k, v = kv.flatten(1, 2)[:, :seq_len].unbind(0)
        qi = q[start:end]
        own, lse_own = _cudnn(qi, k[context:], v[context:], scale, causal=True, need_lse=context > 0)
        if context == 0:
            out[start:end] = own
            continue
        ctx, lse_ctx = _cudnn(qi, k[:context], v[:context], scale, causal=False, need_lse=True)
        _merge(out[start:end], own, lse_own, ctx, lse_ctx)


def _cudnn(q, k, v, scale: float, causal: bool, need_lse: bool):
    """q (L, Hq, D), k and v (S, Hkv, D) -> out (L, Hq, D), lse (Hq, L) float32 or None."""
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], None, need_lse,
        0.0, causal, False, scale=scale)
    out = res[0][0].transpose(0, 1)
    return out, (res[1].reshape(q.shape[1], q.shape[0]) if need_lse else None)


def _merge(out, a, lse_a, b, lse_b) -> None:
    num_tokens, num_heads, head_dim = out.shape
    merge_states_kernel[(num_tokens, num_heads)](
        out, a, b, lse_a, lse_b, out.stride(0), out.stride(1), a.stride(0), a.stride(1),
        b.stride(0), b.stride(1), lse_a.stride(0), lse_b.stride(0),
        HEAD_DIM=head_dim, HEAD_PAD=triton.next_power_of_2(head_dim), num_warps=1)


def _usable(q: torch.Tensor) -> bool:
    return (q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] in (64, 128)
            and ENABLED and _cudnn_on_hopper(q.device))


@functools.cache
def _cudnn_on_hopper(device: torch.device) -> bool:
    """Measured on sm_90 only; elsewhere the Triton kernel stays."""
    return torch.cuda.get_device_capability(device)[0] == 9 and torch.backends.cuda.cudnn_sdp_enabled()
