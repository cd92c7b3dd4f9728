"""Paged attention in Triton: the CUDA path. Same two functions, same contract as torch_backend.

One flat mixed batch, no host sync: kernels read only the device tensors of AttentionMetadata, and grid
sizes depend only on tensor shapes and the host ints max_query_len / max_seq_len, which may be upper
bounds (a CUDA graph is captured once and replayed with new data). Every query token is written by
exactly one kernel:

    rows with one query token (decode) -> decode_partition (split-KV over fixed segments) + decode_reduce
                                          (+ shared_prefix: segments many rows share, read once for all)
    rows with more (prefill chunks)    -> prefill_attention (launched only when max_query_len > 1)
    rows of LONG_QUERY_LEN+ new tokens -> cudnn_prefill, in eager steps on Hopper (prefill_attention skips them)

Decode-only steps without shared segments may hand over the qkv projection's output instead (decode_qkv):
decode_partition then norms and rotates q and k and stores K/V itself, one launch a layer less (unit_offset: the
norms are Gemma's, qk_norm_rope's flag).

An fp8 KV cache (attention/kv_quant.py): the kernels specialise on the cache's element type at compile time;
k_scale is folded into scale_log2 here, v_scale goes to the kernels as a float (both fixed after load, so CUDA
graphs capture them). cudnn_prefill widens an fp8 row's gathered K/V to q's dtype and takes the same scales.

A layer's sliding window and attention-logit soft cap (Gemma 2/3, Mistral): the query at position p sees keys
p - sliding_window + 1 .. p, and a score x = q . k * scale becomes soft_cap * tanh(x / soft_cap). Both are
compile-time constants of the kernels (WINDOW 0 and SOFT_CAP 0.0 compile today's kernels), fixed per layer at
load, so CUDA graphs capture them. A windowed layer's decode rows read their windows alone (no shared segments,
which cut whole contexts); cudnn_prefill keeps such layers' long rows on the Triton kernel.
"""
import functools

import torch
import triton

from pagedllm.attention import cudnn_prefill
from pagedllm.attention.kernels.decode_partition import decode_partition_kernel
from pagedllm.attention.kernels.decode_reduce import decode_reduce_kernel
from pagedllm.attention.kernels.prefill_attention import prefill_attention_kernel
from pagedllm.attention.kernels.reshape_and_cache import reshape_and_cache_kernel
from pagedllm.attention.kernels.shared_prefix import shared_prefix_kernel
from pagedllm.attention.kv_quant import is_fp8
from pagedllm.attention.metadata import AttentionMetadata

PARTITION = 512        # decode segment length in tokens (rows up to PARTITION * MAX_SEGMENTS tokens)
# Decode-only steps of at most SMALL_BATCH_ROWS rows (batch-1 decode, a speculative verify, a draft's pass) cut
# rows into shorter segments: 1 row of 1,000 tokens is 16 programs at 512 (H100: 15.4 us a layer) and 64 at 128
# (7.6 us); W1's 256 rows lose 6% at 128 (393.7 -> 418.8 us), so larger steps keep PARTITION.
# Tried and slower on an H200 (2026-12-05, draft 1 x 1,000 us a layer; W5 speculating ms/token): 64-token segments
# (10.0 against 8.1; 3.244 against 3.082), and the segments merged inside decode_partition by its last program
# instead of a decode_reduce launch (9.3 against 8.1; 3.135 against 3.082; branch exp/merge-in-decode).
SMALL_BATCH_ROWS = 8
SMALL_BATCH_PARTITION = 128
# Such steps plan no shared prefix (shared_prefix.plan_shared_prefix) while their rows' contexts sum to fewer
# tokens than this: shared_prefix and then decode at 512 cost ~28-33 us a layer whatever the context, each row
# reading its own at 128 costs with the sum (H100: a verify of 5 x 1,000, 9.7 us; 5 x 6,000, 31.2 against 30.6;
# 8 x 3,000, 24.9 against 29.6; 8 x 4,000, 31.8 against 29.0; benchmarks/decode_partition_sweep.py --shared).
SMALL_BATCH_SHARE_FROM = 30000
MAX_SEGMENTS = 32      # more context than that: longer segments, never more of them
PROGRAMS_PER_SM = 32   # decode spreads a row's segments over programs until about this many per SM


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
             k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Store token i's K/V (num_tokens, num_kv_heads, head_dim) in slot slot_mapping[i]; slot -1 is padding."""
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    _check_cache(k_cache)
    num_tokens, num_kv_heads, head_dim = k.shape
    if k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("write_kv: k and v need a contiguous head_dim")
    if num_tokens == 0:
        return
    reshape_and_cache_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, 1.0 / k_scale, 1.0 / v_scale,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        BLOCK_SIZE=k_cache.shape[1], HEAD_DIM=head_dim, NUM_ELEMS=num_kv_heads * head_dim,
        NUM_ELEMS_PAD=triton.next_power_of_2(num_kv_heads * head_dim))


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                    k_scale: float = 1.0, v_scale: float = 1.0, sliding_window: int | None = None,
                    soft_cap: float | None = None) -> torch.Tensor:
    """q (num_tokens, num_q_heads, head_dim) -> out of the same shape and dtype."""
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    _check_cache(k_cache)
    num_q_heads, head_dim = q.shape[1:]
    num_kv_heads = k_cache.shape[2]
    if num_q_heads % num_kv_heads or q.stride(2) != 1 or head_dim != k_cache.shape[3]:
        raise ValueError(f"paged_attention: q {tuple(q.shape)} does not fit the KV cache {tuple(kv_cache.shape)}")
    out = torch.empty_like(q)
    if q.shape[0] == 0:
        return out
    k_scale, v_scale, scale_log2 = _scales(k_cache, scale, k_scale, v_scale)
    layer = _layer(sliding_window, soft_cap)
    _decode(q, out, k_cache, v_cache, meta, scale_log2, v_scale, _NO_ROPE, layer)
    if meta.max_query_len > 1:
        long_query_len = cudnn_prefill.threshold(q, meta, sliding_window, soft_cap)
        _prefill(q, out, k_cache, v_cache, meta, scale_log2, v_scale, long_query_len, layer)
        if long_query_len < cudnn_prefill.NEVER:
            cudnn_prefill.attend(q, out, kv_cache, meta, scale, long_query_len, k_scale, v_scale)
    return out


def takes_qkv(meta: AttentionMetadata, head_dim: int) -> bool:
    """Whether decode_qkv serves this step: a small decode-only step (decode_partition's rule: max_query_len 1,
    at most SMALL_BATCH_ROWS rows, no shared segments; host ints a CUDA graph's metadata sets alike), head_dim a
    power of two (whole heads are decode_partition's tiles). The launch it saves weighs in batch-1 steps (issue
    16: a draft's passes, the target's decode); larger steps keep qk_norm_rope until W1 measures otherwise."""
    return decode_partition(meta) == SMALL_BATCH_PARTITION and _fits_qkv(meta, head_dim)


def _fits_qkv(meta: AttentionMetadata, head_dim: int) -> bool:
    """decode_qkv's own bounds: decode only, no shared segments, head_dim a power of two."""
    return meta.max_query_len == 1 and meta.shared is None and head_dim >= 16 and not head_dim & (head_dim - 1)


def decode_qkv(qkv: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, num_q_heads: int,
               q_norm: tuple[torch.Tensor, float] | None, k_norm: tuple[torch.Tensor, float] | None,
               kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float, k_scale: float = 1.0,
               v_scale: float = 1.0, sliding_window: int | None = None, soft_cap: float | None = None,
               unit_offset: bool = False) -> torch.Tensor:
    """qk_norm_rope (with its cache write; unit_offset: Gemma's norms) then paged_attention, in a decode-only step
    without shared segments (takes_qkv says where it is used): qkv (T, (Hq + 2*Hkv) * D) -> out (T, Hq, D)."""
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    _check_cache(k_cache)
    num_tokens, (num_kv_heads, head_dim) = qkv.shape[0], k_cache.shape[2:]
    if not _fits_qkv(meta, head_dim) or qkv.shape[1] != (num_q_heads + 2 * num_kv_heads) * head_dim \
            or qkv.stride(1) != 1 or num_q_heads % num_kv_heads:
        raise ValueError(f"decode_qkv: qkv {tuple(qkv.shape)} with {num_q_heads} q heads does not fit the KV cache "
                         f"{tuple(kv_cache.shape)}, or the step is not decode-only")
    out = torch.empty(num_tokens, num_q_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if num_tokens == 0:
        return out
    k_scale, v_scale, scale_log2 = _scales(k_cache, scale, k_scale, v_scale)
    (q_w, q_eps), (k_w, k_eps) = q_norm or (qkv, 0.0), k_norm or (qkv, 0.0)
    rope = dict(pos_ptr=positions, cos_sin_ptr=cos_sin_cache, stride_cos_sin=cos_sin_cache.stride(0), q_w_ptr=q_w,
                k_w_ptr=k_w, q_eps=q_eps, k_eps=k_eps, slot_ptr=meta.slot_mapping, k_inv=1.0 / k_scale,
                v_inv=1.0 / v_scale, ROPE=True, HAS_NORM=q_norm is not None, UNIT_OFFSET=unit_offset,
                NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads)
    heads = qkv.view(num_tokens, num_q_heads + 2 * num_kv_heads, head_dim)
    _decode(heads, out, k_cache, v_cache, meta, scale_log2, v_scale, rope, _layer(sliding_window, soft_cap))
    return out


def _scales(k_cache: torch.Tensor, scale: float, k_scale: float, v_scale: float) -> tuple[float, float, float]:
    """(k_scale, v_scale, scale_log2) as the kernels take them: the scales apply to fp8 caches only (floats: no
    int specialisation); k_scale multiplies the scores, folded into scale_log2 (exp(x) = exp2(x * log2(e)))."""
    k_scale, v_scale = (float(k_scale), float(v_scale)) if is_fp8(k_cache.dtype) else (1.0, 1.0)
    return k_scale, v_scale, scale * k_scale * 1.4426950408889634


def _layer(sliding_window: int | None, soft_cap: float | None) -> dict:
    """The kernels' WINDOW and SOFT_CAP constants (0: off) for a layer's sliding window and soft cap."""
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
        raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window!r}")
    if soft_cap is not None and not soft_cap > 0:
        raise ValueError(f"soft_cap must be positive or None, got {soft_cap!r}")
    return dict(WINDOW=sliding_window or 0, SOFT_CAP=float(soft_cap or 0.0))


def _decode(q, out, k_cache, v_cache, meta: AttentionMetadata, scale_log2: float, v_scale: float,
            rope: dict, layer: dict) -> None:
    """q: (T, heads, D) rows the kernel reads its query heads from (with ROPE: all of qkv's heads). layer: _layer's
    constants; a windowed layer reads only its rows' windows and no shared segments."""
    num_reqs = meta.seq_lens.shape[0]
    num_q_heads, head_dim = out.shape[1:]
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = num_q_heads // num_kv_heads
    tile_n, num_warps, num_stages = _decode_config(q.dtype, k_cache.dtype, head_dim)
    partition = decode_partition(meta)
    # Scratch holds every segment a row up to max_seq_len can have (a windowed layer's rows: their windows);
    # num_splits only spreads them over programs (enough of them to fill the GPU), so neither changes any
    # row's result.
    window = layer["WINDOW"]
    span = min(meta.max_seq_len, window) if window else meta.max_seq_len
    max_segments = min(MAX_SEGMENTS, triton.cdiv(max(span, 1), partition))
    num_splits = max(1, min(max_segments, triton.cdiv(_target_programs(q.device), num_reqs * num_kv_heads)))
    # Scratch widths 1 or a multiple of 16 only: Triton specialises the strides they make on 1 and on 16 | n,
    # so any other width built a kernel in the middle of a run (H200: 0.49 s in a process's first W1 run)
    width = 1 if max_segments == 1 else min(MAX_SEGMENTS, triton.cdiv(max_segments, 16) * 16)
    part_out = torch.empty(num_reqs, num_q_heads, width, head_dim, dtype=torch.float32, device=q.device)
    part_max = torch.empty(num_reqs, num_q_heads, width, dtype=torch.float32, device=q.device)
    part_sum = torch.empty_like(part_max)
    head_pad = _head_pad(head_dim)
    shared = meta.shared if not window else None
    if shared is not None:
        if PARTITION % tile_n:
            raise ValueError(f"shared_prefix: PARTITION {PARTITION} is not a multiple of the tile {tile_n}")
        group_pad = triton.next_power_of_2(group)
        shared_prefix_kernel[(shared.items.shape[0], num_kv_heads)](
            q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, shared.items, shared.rows,
            part_out, part_max, part_sum, scale_log2, v_scale,
            q.stride(0), q.stride(1), meta.block_tables.stride(0),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            part_out.stride(0), part_out.stride(1), part_out.stride(2), part_max.stride(0), part_max.stride(1),
            GROUP=group, GROUP_PAD=group_pad, ROWS=shared.rows_per_item, HEAD_DIM=head_dim, HEAD_PAD=head_pad,
            BLOCK_SIZE=block_size, TILE_N=tile_n, PARTITION=PARTITION, PRECISION=_precision(q),
            SOFT_CAP=layer["SOFT_CAP"], num_warps=4, num_stages=2)
    decode_partition_kernel[(num_reqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
        meta.seq_lens if shared is None else shared.first_seg,   # not read without HAS_SHARED
        part_out, part_max, part_sum, scale_log2, v_scale, num_splits,
        q.stride(0), q.stride(1), meta.block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        part_out.stride(0), part_out.stride(1), part_out.stride(2), part_max.stride(0), part_max.stride(1),
        GROUP=group, BLOCK_M=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, HEAD_PAD=head_pad,
        BLOCK_SIZE=block_size, TILE_N=tile_n, PARTITION=partition, MAX_SEGMENTS=MAX_SEGMENTS,
        PRECISION=_precision(q), HAS_SHARED=shared is not None, num_warps=num_warps, num_stages=num_stages,
        **layer, **rope)
    decode_reduce_kernel[(num_reqs, num_q_heads)](
        out, part_out, part_max, part_sum, meta.seq_lens, meta.query_start_loc,
        out.stride(0), out.stride(1),
        part_out.stride(0), part_out.stride(1), part_out.stride(2), part_max.stride(0), part_max.stride(1),
        HEAD_DIM=head_dim, HEAD_PAD=head_pad, PARTITION=partition, MAX_SEGMENTS=MAX_SEGMENTS, TILE_N=tile_n,
        WINDOW=window, num_warps=1)


# decode_partition's arguments when q is already normed, rotated and K/V stored (not read: any tensor, number)
_NO_ROPE = dict(pos_ptr=None, cos_sin_ptr=None, stride_cos_sin=0, q_w_ptr=None, k_w_ptr=None, q_eps=0.0, k_eps=0.0,
                slot_ptr=None, k_inv=1.0, v_inv=1.0, ROPE=False, HAS_NORM=False, UNIT_OFFSET=False, NUM_Q_HEADS=0,
                NUM_KV_HEADS=0)


def decode_partition(meta: AttentionMetadata) -> int:
    """The step's decode segment length: SMALL_BATCH_PARTITION for a decode-only step (max_query_len 1) of at
    most SMALL_BATCH_ROWS rows without shared prefixes, else PARTITION. A CUDA graph's metadata decides alike:
    decode graphs have max_query_len 1 and pad rows to a capture size (1, 2, 4, 8, 16, ...: at most 8 rows stay
    at most 8), mixed graphs bound max_query_len by their tokens. So a row's result depends on the row and on
    this choice only, and graph replay equals eager."""
    if meta.max_query_len == 1 and meta.seq_lens.shape[0] <= SMALL_BATCH_ROWS and meta.shared is None:
        return SMALL_BATCH_PARTITION
    return PARTITION


def _prefill(q, out, k_cache, v_cache, meta: AttentionMetadata, scale_log2: float, v_scale: float,
             long_query_len: int, layer: dict) -> None:
    num_tokens, num_q_heads, head_dim = q.shape
    num_reqs = meta.seq_lens.shape[0]
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = num_q_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    block_m, tile_n, num_warps, num_stages = _prefill_config(q.dtype, head_dim)
    # Tile rows = BLOCK_Q tokens x group_pad heads (>= 16 rows for tl.dot). One BLOCK_Q per model and
    # dtype, not one per max_query_len: each new value would compile a kernel in the middle of a run.
    block_q = max(1, 16 // group_pad, block_m // group_pad)
    # Request i's q blocks are numbered from query_start_loc[i] // block_q + i, so all of them fit below
    # num_tokens // block_q + num_reqs (ceil(n / b) <= n // b + 1); numbers in the gaps return at once.
    num_q_blocks = num_tokens // block_q + num_reqs
    prefill_attention_kernel[(num_q_blocks, num_kv_heads)](
        q, out, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
        num_reqs, long_query_len, scale_log2, v_scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), meta.block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, HEAD_DIM=head_dim, HEAD_PAD=_head_pad(head_dim),
        BLOCK_SIZE=block_size, TILE_N=tile_n, PRECISION=_precision(q), num_warps=num_warps, num_stages=num_stages,
        **layer)


# Tile shapes, checked by compiling for sm_90 (no register spills) and by the benchmark on an H200.
def shared_rows_per_item(dtype: torch.dtype, group: int) -> int:
    """Requests a shared_prefix program serves: tile rows (requests x padded group) of 64, as the prefill
    tiles; 16 in float32, whose true-fp32 dots run on FMA units."""
    return max(1, (16 if dtype == torch.float32 else 64) // triton.next_power_of_2(group))


def _decode_config(dtype: torch.dtype, cache_dtype: torch.dtype, head_dim: int) -> tuple[int, int, int]:
    """(TILE_N, num_warps, num_stages) of decode_partition and the shared-prefix kernel."""
    if dtype == torch.float32 or head_dim > 128:
        return 32, 4, 2
    if cache_dtype == torch.float8_e4m3fn:
        # fp8 tiles are half the bytes: twice the keys a tile keeps as many bytes in flight. H200 (Qwen3-0.6B
        # heads, us, (64, 4, 2) -> (128, 4, 3)): W1's 256 rows 290 -> 231, 4 x 32k 149 -> 114, 32 x 30k 853 -> 646.
        # A segment holds whole tiles (the interpreter tests shrink PARTITION to 64)
        return min(128, PARTITION), 4, 3
    return 64, 4, 2


def _prefill_config(dtype: torch.dtype, head_dim: int) -> tuple[int, int, int, int]:
    """(tile rows, TILE_N, num_warps, num_stages) of prefill_attention."""
    if dtype == torch.float32:
        return 16, 64, 4, 2      # true-fp32 dots run on FMA units: bigger tiles spill registers
    if head_dim > 128:
        return 64, 32, 4, 2
    return 64, 64, 4, 3      # H200 sweep: 367 us on W2's 8192-token chunk (128x64: 383), 236 on W3 (258)


def _check_cache(k_cache: torch.Tensor) -> None:
    if k_cache.stride(3) != 1:
        raise ValueError("KV cache: head_dim must be contiguous (layout (2, num_blocks, block_size, Hkv, D))")


def _head_pad(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))      # tl.dot needs K >= 16; extra dims are masked


def _precision(q: torch.Tensor) -> str:
    # float32 runs in true fp32 (so GPU greedy decoding matches the CPU path); tf32 would round inputs.
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _target_programs(device: torch.device) -> int:
    """Decode programs that fill the GPU: a few per SM (the interpreter on CPU: a handful)."""
    return PROGRAMS_PER_SM * _num_sms(device) if device.type == "cuda" else 8


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count
