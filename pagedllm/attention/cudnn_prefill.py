"""Long prompt rows through cuDNN's fused attention (PyTorch's SDPA cuDNN backend): FA3-class speed on Hopper.

H200, bf16, causal, Qwen3-0.6B heads (benchmarks/prefill_long.py): cuDNN 550 / 619 / 575 TFLOP/s at 8k / 16k /
32k tokens, the Triton prefill kernel 324 / 337 / 355 (its paged gathers keep it off TMA and warp-specialized
pipelines). So a row with at least LONG_QUERY_LEN new tokens, in a step that runs eagerly, goes to cuDNN:

    K/V of its context and new tokens are gathered from the paged cache into one contiguous buffer (by slot)
    queries are padded, and the row is cut into calls of a few fixed shapes (cudnn_shapes.py): a causal
    "square" (its own tokens and the context past the last multiple of 4096) and context pieces of 8192 /
    4096 keys (no mask), each with its log-sum-exp, merged into out (_merge)

The Triton prefill kernel skips these rows (it reads the same threshold). Steps inside CUDA graphs keep the
Triton kernels (the routing is a host decision; graphs replay one).

Why fixed shapes: cuDNN builds an execution plan for every new (query, key) shape, 55-70 ms each on the H200
(1.3 s for the first), and chunked prefill brings new shapes nearly every step: with one call per exact shape
W4-prefill took 12.65 s against 11.60 s with Triton only (W4: 20.4 against 18.3), though each call ran at
560-610 TFLOP/s once planned. Now the shapes a step budget and max_model_len can produce are a fixed set (52
for W4: 16384 tokens a step, max_model_len 32768), each built once at start-up (prebuild_plans: ~3 s there
at ~60 ms a plan, after cuDNN's own 1.3 s for its first).
Shorter rows lose even when planned (host cost per call: fresh 4k prompts 205 TFLOP/s against the Triton
kernel's 310; it wins from 8k fresh, or 2k new tokens after 28k cached).

Measured with plans pre-built (H200, 2026-12-03): W4-prefill 8.87 s against 11.43 s with Triton only, W4 15.84
against 18.36; start-up +4.6 s (52 plans in 3.1 s). A step routes rows only when one has MIN_PAIRS+ (query, key)
pairs, so W1-W3 (prompts up to 2k) never take the path, and no plan is built unless max_model_len can reach it.
PAGEDLLM_CUDNN_PREFILL: 1 on, 0 off, unset: DEFAULT_ON (on).
cuDNN's plan cache is per thread: plans are pre-built by the thread that builds the runner, which runs its steps.
"""
import functools
import logging
import os
import time
from dataclasses import dataclass, field

import torch

from pagedllm.attention.cudnn_shapes import RowSplit, reachable_shapes
from pagedllm.attention.metadata import AttentionMetadata

logger = logging.getLogger("pagedllm")

DEFAULT_ON = True         # the path with PAGEDLLM_CUDNN_PREFILL unset (Hopper, bf16/fp16, head 64/128 only)
LONG_QUERY_LEN = 1024     # rows with fewer new tokens stay on the Triton kernel (measured: see the module doc)
# ... and so do steps without a row of at least this many (query, key) pairs (new tokens x seq_len). Measured on
# the H200 (planned calls): fresh 4k and 1k after 15k (16M pairs) lose to the Triton kernel (205 / 298 against
# 310 / 330 TFLOP/s), fresh 8k and 2k after 28k (60M+) win (461 / 458 against 319 / 339). W1-W3 never get here.
MIN_PAIRS = 1 << 25
NEVER = 1 << 30           # the Triton kernel's threshold when no row is routed here


def read_switch(value: str | None) -> bool:
    if value is None or value == "":
        return DEFAULT_ON
    if value not in ("0", "1"):
        raise ValueError(f"PAGEDLLM_CUDNN_PREFILL must be 0 (off) or 1 (on), got {value!r}")
    return value == "1"


ENABLED = read_switch(os.environ.get("PAGEDLLM_CUDNN_PREFILL"))   # read once: threshold() runs every layer


def threshold(q: torch.Tensor, meta: AttentionMetadata) -> int:
    """The query length from which rows of this step go to cuDNN (NEVER: none do): the shortest row of
    LONG_QUERY_LEN+ new tokens and MIN_PAIRS+ pairs, when there is one (rows as long sharing its step go too)."""
    if meta.max_query_len < LONG_QUERY_LEN or not _usable(q.dtype, q.shape[-1], q.device) \
            or torch.cuda.is_current_stream_capturing():
        return NEVER
    return _route(meta).threshold


@dataclass
class _RowPlan:
    """What every layer of a step reads the same for one row: its split, the cache slots of its keys, and the
    query rows of its padded buffer."""
    split: RowSplit
    slots: torch.Tensor
    query_rows: torch.Tensor


@dataclass
class _Route:
    threshold: int
    rows: dict[int, _RowPlan] = field(default_factory=dict)   # by row index, built at the step's first layer


_memo: list = [None, None]    # (the step's metadata, its _Route): held, so that its id is not reused


def _route(meta: AttentionMetadata) -> _Route:
    if _memo[0] is not meta:
        _memo[:] = [meta, _Route(_step_threshold(meta))]
    return _memo[1]


def _step_threshold(meta: AttentionMetadata) -> int:
    starts, seq_lens = meta.query_start_loc_cpu, meta.seq_lens_cpu
    lens = [starts[i + 1] - starts[i] for i in range(len(seq_lens))]
    return min((n for n, s in zip(lens, seq_lens) if n >= LONG_QUERY_LEN and n * s >= MIN_PAIRS), default=NEVER)


def attend(q: torch.Tensor, out: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
           long_query_len: int, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Writes out[] for every row with at least long_query_len new tokens. An fp8 cache: the gathered K/V are
    converted to q's dtype (exact for e4m3), k_scale goes into cuDNN's scale and v_scale into the merge."""
    starts, seq_lens, plans = meta.query_start_loc_cpu, meta.seq_lens_cpu, _route(meta).rows
    for i, seq_len in enumerate(seq_lens):
        start, end = starts[i], starts[i + 1]
        if end - start >= long_query_len:
            plan = plans.get(i)
            if plan is None:
                plan = plans[i] = _row_plan(end - start, seq_len, meta.block_tables[i], kv_cache.shape[2])
            _attend_row(q[start:end], out[start:end], kv_cache, plan, scale * k_scale, v_scale)


def _row_plan(query_len: int, seq_len: int, block_table: torch.Tensor, block_size: int) -> _RowPlan:
    split = RowSplit(query_len, seq_len - query_len)
    # Key i of the gathered K/V is position i; those past seq_len repeat the last key: the square's dummy keys
    # (read only by dummy query rows), with no read outside the row's blocks.
    pos = torch.arange(split.context_big + split.square, device=block_table.device).clamp_(max=seq_len - 1)
    slots = block_table.long()[pos // block_size] * block_size + pos % block_size
    # Query row i of the buffer is real query i - lead; rows outside [lead, lead + L) repeat an end one.
    rows = (torch.arange(split.query_rows, device=block_table.device) - split.lead).clamp_(0, query_len - 1)
    return _RowPlan(split, slots, rows)


def _attend_row(q, out, kv_cache, plan: _RowPlan, scale: float, v_scale: float) -> None:
    split, query_len = plan.split, q.shape[0]
    lead, square = split.lead, split.square
    num_kv_heads, head_dim = kv_cache.shape[3:]
    fp8 = kv_cache.dtype == torch.float8_e4m3fn   # gathered as bytes, then widened: half the gather's reads
    kv = (kv_cache.view(torch.uint8) if fp8 else kv_cache).view(2, -1, num_kv_heads, head_dim)
    kv = kv.index_select(1, plan.slots)
    k, v = (kv.view(torch.float8_e4m3fn).to(q.dtype) if fp8 else kv).unbind(0)
    queries = q.index_select(0, plan.query_rows)
    ctx = split.context_big
    o, lse = _cudnn(queries[:square], k[ctx:ctx + square], v[ctx:ctx + square], scale, causal=True)
    parts = [(o[lead:lead + query_len], lse[:, lead:lead + query_len])]
    piece_queries = queries[lead:lead + split.padded_query_len]
    for first, n in split.pieces:
        o, lse = _cudnn(piece_queries, k[first:first + n], v[first:first + n], scale, causal=False)
        parts.append((o[:query_len], lse[:, :query_len]))
    _merge(out, parts, v_scale)


def _cudnn(q, k, v, scale: float, causal: bool):
    """q (L, Hq, D), k and v (S, Hkv, D), rows contiguous -> out (L, Hq, D), lse (Hq, L) float32 (natural log).
    The log-sum-exp is asked for by every call, so that one plan serves a shape with or without context."""
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], None, True,
        0.0, causal, False, scale=scale)
    return res[0][0].transpose(0, 1), res[1].reshape(q.shape[1], q.shape[0])


def _merge(out: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor]], v_scale: float = 1.0) -> None:
    """out (L, H, D) = v_scale x attention over the union of the parts' disjoint key sets, from each part's
    normalized output (L, H, D) and log-sum-exp (H, L); fp32 accumulation, one rounding, no host sync. On CUDA
    one merge kernel a part after the first (an fp32 accumulator between them); the torch fold elsewhere."""
    if len(parts) == 1:
        out.copy_(parts[0][0] if v_scale == 1.0 else parts[0][0].float() * v_scale)
    elif not out.is_cuda:
        _merge_torch(out, parts, v_scale)
    else:   # W4's chunks after a 28k context: 5 parts; the torch fold took ~6 kernels a part
        acc, acc_lse = parts[0]
        if len(parts) > 2:   # the parts between the first and the last fold into an fp32 accumulator
            buf = torch.empty(out.shape, dtype=torch.float32, device=out.device)
            buf_lse = torch.empty(acc_lse.shape, dtype=torch.float32, device=out.device)
        for o, lse in parts[1:-1]:
            _merge_two(buf, acc, acc_lse, o, lse, lse_out=buf_lse)
            acc, acc_lse = buf, buf_lse
        _merge_two(out, acc, acc_lse, *parts[-1], v_scale)


def _merge_torch(out, parts, v_scale: float = 1.0) -> None:
    """Folds the parts in one at a time (only one part's output besides the fp32 sum is held at once)."""
    acc, acc_lse = parts[0][0].float(), parts[0][1]
    for o, lse in parts[1:]:
        top = torch.maximum(acc_lse, lse)
        w_acc, w_new = torch.exp(acc_lse - top), torch.exp(lse - top)
        total = w_acc + w_new
        acc.mul_((w_acc / total).t()[..., None]).addcmul_(o, (w_new / total).t()[..., None])
        acc_lse = top + torch.log(total)
    out.copy_(acc if v_scale == 1.0 else acc.mul_(v_scale))


def _merge_two(out, a, lse_a, b, lse_b, v_scale: float = 1.0, lse_out: torch.Tensor | None = None) -> None:
    from pagedllm.attention.kernels.merge_states import merge_states_kernel   # CUDA only: the CPU imports no triton
    num_tokens, num_heads, head_dim = out.shape
    lse_o = lse_a if lse_out is None else lse_out   # not written without WRITE_LSE
    merge_states_kernel[(num_tokens, num_heads)](
        out, a, b, lse_a, lse_b, lse_o, float(v_scale), out.stride(0), out.stride(1), a.stride(0), a.stride(1),
        b.stride(0), b.stride(1), lse_a.stride(0), lse_b.stride(0), lse_o.stride(0),
        HEAD_DIM=head_dim, HEAD_PAD=1 << (head_dim - 1).bit_length(), WRITE_LSE=lse_out is not None, num_warps=1)


@torch.inference_mode()
def prebuild_plans(num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                   max_num_batched_tokens: int, max_model_len: int) -> int:
    """Builds cuDNN's plan of every call shape the engine's limits can produce (one dummy call each), so that
    no step pays for one; returns their number (0: the path is off for this model or these limits)."""
    global ENABLED
    if not _usable(dtype, head_dim, device):
        return 0
    shapes = sorted(reachable_shapes(LONG_QUERY_LEN, max_num_batched_tokens, max_model_len))
    if not shapes or min(max_num_batched_tokens, max_model_len) * max_model_len < MIN_PAIRS:   # no row gets here
        return 0
    start = time.perf_counter()
    try:
        _build(shapes, num_q_heads, num_kv_heads, head_dim, dtype, device)
    except RuntimeError as e:       # a shape cuDNN refuses: the Triton kernel keeps every row
        ENABLED = False
        logger.warning("cuDNN prefill off: building its plans failed: %s", str(e).splitlines()[0][:300])
        return 0
    logger.info("cuDNN prefill: %d plans built in %.1f s (rows of %d+ new tokens, budget %d, max_model_len %d)",
                len(shapes), time.perf_counter() - start, LONG_QUERY_LEN, max_num_batched_tokens, max_model_len)
    return len(shapes)


def _build(shapes, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
    queries = torch.zeros(max(n for _, n, _ in shapes), num_q_heads, head_dim, dtype=dtype, device=device)
    keys = torch.zeros(max(n for _, _, n in shapes), num_kv_heads, head_dim, dtype=dtype, device=device)
    for causal, n, num_keys in shapes:
        o, lse = _cudnn(queries[:n], keys[:num_keys], keys[:num_keys], head_dim ** -0.5, causal)
    for lead in (0, 1):     # the merge kernels (two parts; four: the fold), for a square's LSE view aligned or not
        square, piece = (o[lead:], lse[:, lead:]), (o[lead:], lse[:, :n - lead])
        _merge(queries[lead:n], [square, piece])
        _merge(queries[lead:n], [square, piece, piece, piece])
    torch.cuda.synchronize(device)


def _usable(dtype: torch.dtype, head_dim: int, device: torch.device) -> bool:
    return (dtype in (torch.bfloat16, torch.float16) and head_dim in (64, 128) and ENABLED
            and device.type == "cuda" and _cudnn_on_hopper(device))


@functools.cache
def _cudnn_on_hopper(device: torch.device) -> bool:
    """Measured on sm_90 only; elsewhere the Triton kernel stays."""
    return torch.cuda.get_device_capability(device)[0] == 9 and torch.backends.cuda.cudnn_sdp_enabled()
