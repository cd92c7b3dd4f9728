"""Long prompt rows through cuDNN's fused attention on Hopper: one call a row, one execution plan for all rows.

H200, bf16, causal, Qwen3-0.6B heads (benchmarks/prefill_long.py, cudnn_graph_prefill.py): cuDNN 550-578
TFLOP/s on rows of 8k-16k new tokens after 0-24k cached ones, the Triton prefill kernel 324-370 (its paged
gathers keep it off TMA and warp-specialized pipelines). So a row with at least LONG_QUERY_LEN new tokens, in a
step that runs eagerly, goes to cuDNN:

    the K/V of its context and new tokens are gathered from the paged cache into contiguous rows (by slot; an
    fp8 cache's widened to q's dtype, exact for e4m3), and one cuDNN call attends the row's queries to them,
    causal from the bottom right (new token j sees the C cached keys and new keys 0..j), into the row's out

The call is built with cuDNN's graph API (nvidia-cudnn-frontend): q, out, K and V are declared as packed rows
(ragged offsets) of fixed maxima, max_num_batched_tokens queries and max_model_len keys, with the row's lengths
read on the device. So one plan serves every row, and the work follows the row's own lengths. With aten's SDPA
(top-left causal only, a plan for each shape, 55-70 ms to build) a row had to be cut into pieces of a fixed set
of shapes whose parts were merged: 52 plans to build at start-up for W4's limits, merges and padded pairs.

Measured on an H100 (2026-12-05, cuDNN 9.19, frontend 1.22.1, benchmarks/cudnn_graph_prefill.py): a single row
runs at about the speed of the cut-and-merged calls (523-551 TFLOP/s against 525-552 on rows of 8k-16k new
tokens; a plan built for the row's exact shape would run 5-10% faster, but every shape would need one). What
one call a row saves is the rest: W4's prefill rows replayed on one layer (prefill_long.py --chunks) 231 ms
against 237; W4-prefill 8.52 s against 8.87, W4 18.51 against 18.83; the plan builds in 0.1 s, where the 52
took 5.8 s. Memcheck finds no access outside a row's own buffers.

The softmax scale is part of a plan: start-up builds head_dim ** -0.5's; another scale (a model's own, or an
fp8 cache's k_scale folded in) gets its plan at its first long row (0.05-0.1 s, once).
A step routes rows only when one has MIN_PAIRS+ (query, key) pairs, so W1-W3 (prompts up to 2k) never take the
path. Steps inside CUDA graphs keep the Triton kernels (the routing is a host decision; graphs replay one).
PAGEDLLM_CUDNN_PREFILL: 1 on, 0 off, unset: DEFAULT_ON (on). Without the frontend package or off Hopper, every
row stays on the Triton kernels.
PAGEDLLM_LONG_PREFILL: the kernel the routed rows go to. Unset: FlashAttention-4's Hopper kernel where the
flash-attn-4 package is installed and compiles for the model's heads at start-up (fa4_prefill.py; the `fa4` extra),
else cuDNN; cudnn or fa4 asks for one (fa4 still falls back to cuDNN when it cannot run).
"""
import functools
import logging
import os
import time
from dataclasses import dataclass, field

import torch

from pagedllm.attention import fa4_prefill
from pagedllm.attention.metadata import AttentionMetadata

logger = logging.getLogger("pagedllm")

DEFAULT_ON = True         # the path with PAGEDLLM_CUDNN_PREFILL unset (Hopper, bf16/fp16, head 64/128 only)
LONG_QUERY_LEN = 1024     # rows with fewer new tokens stay on the Triton kernel (measured: see the module doc)
# ... and so do steps without a row of at least this many (query, key) pairs (new tokens x seq_len). Measured on
# the H200 (aten's cuDNN calls): fresh 4k and 1k after 15k (16M pairs) lost to the Triton kernel, fresh 8k and 2k
# after 28k (60M+) won. W1-W3 never get here.
MIN_PAIRS = 1 << 25
NEVER = 1 << 30           # the Triton kernel's threshold when no row is routed here
MIN_MAXIMA = 1 << 14      # the plan's maxima when no limits were given (prebuild_plans): powers of two from this


def read_switch(value: str | None) -> bool:
    if value is None or value == "":
        return DEFAULT_ON
    if value not in ("0", "1"):
        raise ValueError(f"PAGEDLLM_CUDNN_PREFILL must be 0 (off) or 1 (on), got {value!r}")
    return value == "1"


def read_kernel(value: str | None) -> str:
    if value is None or value == "":
        return "auto"
    if value not in ("cudnn", "fa4"):
        raise ValueError(f"PAGEDLLM_LONG_PREFILL must be cudnn or fa4, got {value!r}")
    return value


ENABLED = read_switch(os.environ.get("PAGEDLLM_CUDNN_PREFILL"))   # read once: threshold() runs every layer
KERNEL = read_kernel(os.environ.get("PAGEDLLM_LONG_PREFILL"))   # prebuild_plans settles auto: fa4 or cudnn
_limits: list[int] = [0, 0]   # (queries, keys) of the plans prebuild_plans built: the engine's limits


def threshold(q: torch.Tensor, meta: AttentionMetadata, sliding_window: int | None = None,
              soft_cap: float | None = None) -> int:
    """The query length from which rows of this step go to cuDNN (NEVER: none do): the shortest row of
    LONG_QUERY_LEN+ new tokens and MIN_PAIRS+ pairs, when there is one (rows as long sharing its step go too).
    Never for a layer with a sliding window or a soft cap: the calls here are plain causal attention (FA4 takes
    both, cuDNN's graph a band; neither wired nor measured yet), so its rows stay on the Triton kernel."""
    if meta.max_query_len < LONG_QUERY_LEN or sliding_window or soft_cap \
            or not _usable(q.dtype, q.shape[-1], q.device) or torch.cuda.is_current_stream_capturing():
        return NEVER
    return _route(meta).threshold


@dataclass
class _RowCall:
    """What every layer of a step reads the same for one row: the cache slots of its keys, and its lengths and
    ragged offsets on the device (queries, keys, then the offsets [0, end] of its q / out rows and of its K/V;
    then FlashAttention's cu_seqlens [0, queries] and [0, keys])."""
    slots: torch.Tensor     # (seq_len,) int64
    lens: torch.Tensor      # (10,) int32


@dataclass
class _Route:
    threshold: int
    rows: dict[int, _RowCall] = field(default_factory=dict)   # by row index, built at the step's first layer


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
    widened to q's dtype (exact), k_scale goes into cuDNN's scale and v_scale onto the row's output."""
    starts, seq_lens, calls = meta.query_start_loc_cpu, meta.seq_lens_cpu, _route(meta).rows
    num_heads, (num_kv_heads, head_dim) = q.shape[1], kv_cache.shape[3:]
    for i, seq_len in enumerate(seq_lens):
        start, end = starts[i], starts[i + 1]
        if end - start >= long_query_len:
            call = calls.get(i)
            if call is None:
                call = calls[i] = _row_call(end - start, seq_len, meta.block_tables[i], kv_cache.shape[2],
                                            num_heads * head_dim, num_kv_heads * head_dim)
            _attend_row(q[start:end], out[start:end], kv_cache, call, scale * k_scale, v_scale)


def _row_call(query_len: int, seq_len: int, block_table: torch.Tensor, block_size: int, q_row: int,
              kv_row: int) -> _RowCall:
    pos = torch.arange(seq_len, device=block_table.device)
    slots = block_table.long()[pos // block_size] * block_size + pos % block_size
    lens = _lens(query_len, seq_len, q_row, kv_row)
    if block_table.is_cuda:
        lens = lens.pin_memory().to(block_table.device, non_blocking=True)
    return _RowCall(slots, lens)


def _lens(query_len: int, seq_len: int, q_row: int, kv_row: int) -> torch.Tensor:
    """_RowCall.lens on the host: the lengths, the ragged offsets [0, end] of q / out and of K/V (q_row,
    kv_row: elements a token), then the cu_seqlens of queries and keys."""
    return torch.tensor([query_len, seq_len, 0, query_len * q_row, 0, seq_len * kv_row, 0, query_len, 0, seq_len],
                        dtype=torch.int32)


def _attend_row(q, out, kv_cache, call: _RowCall, scale: float, v_scale: float) -> None:
    num_kv_heads, head_dim = kv_cache.shape[3:]
    fp8 = kv_cache.dtype == torch.float8_e4m3fn   # gathered as bytes, then widened: half the gather's reads
    dst = out if out.is_contiguous() else torch.empty(out.shape, dtype=out.dtype, device=out.device)
    kv = (kv_cache.view(torch.uint8) if fp8 else kv_cache).view(2, -1, num_kv_heads, head_dim)
    kv = kv.index_select(1, call.slots)
    k, v = (kv.view(torch.float8_e4m3fn).to(q.dtype) if fp8 else kv).unbind(0)
    if KERNEL == "fa4":
        fa4_prefill.attend(q.contiguous(), k, v, dst, call.lens[6:8], call.lens[8:10], scale)
    else:
        _cudnn(q.contiguous(), k, v, dst, call.lens, scale)    # packed rows in, packed rows out
    if v_scale != 1.0:
        dst.mul_(v_scale)
    if dst is not out:
        out.copy_(dst)


def _cudnn(q, k, v, out, lens, scale: float) -> None:
    """out (L, Hq, D) = causal (bottom-right) attention of q (L, Hq, D) over k, v (S, Hkv, D), all contiguous
    rows; lens as _RowCall's. The plan's maxima: the engine's limits, or powers of two that hold the row."""
    (num_queries, num_heads, head_dim), (num_keys, num_kv_heads, _) = q.shape, k.shape
    q_max, kv_max = _limits
    if num_queries > q_max or num_keys > kv_max:
        q_max, kv_max = (max(MIN_MAXIMA, 1 << (n - 1).bit_length()) for n in (num_queries, num_keys))
    graph, workspace = _plan(q.dtype, num_heads, num_kv_heads, head_dim, q_max, kv_max, scale, q.device)
    ws = torch.empty(workspace, dtype=torch.uint8, device=q.device)
    graph.execute({_Q: q, _K: k, _V: v, _O: out, _SEQ_Q: lens[0:1], _SEQ_KV: lens[1:2], _RAGGED_Q: lens[2:4],
                   _RAGGED_KV: lens[4:6]}, ws, handle=_handle(q.device))


_Q, _K, _V, _O, _SEQ_Q, _SEQ_KV, _RAGGED_Q, _RAGGED_KV = range(1, 9)   # the graph's tensor ids


@functools.cache
def _plan(dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int, q_max: int, kv_max: int,
          scale: float, device: torch.device):
    """cuDNN's graph for rows of up to q_max queries and kv_max keys, its plan built; and its workspace bytes."""
    cudnn = _frontend()
    io = {torch.bfloat16: cudnn.data_type.BFLOAT16, torch.float16: cudnn.data_type.HALF}[dtype]
    f32, i32 = cudnn.data_type.FLOAT, cudnn.data_type.INT32
    g = cudnn.pygraph(handle=_handle(device), io_data_type=io, intermediate_data_type=f32, compute_data_type=f32)

    def layout(n, heads):     # (1, heads, n, head_dim) as packed rows: token-major, heads inside
        return {"dim": [1, heads, n, head_dim], "stride": [n * heads * head_dim, head_dim, heads * head_dim, 1]}

    def ints(name, uid, n):
        return g.tensor(name=name, dim=[n, 1, 1, 1], stride=[1, 1, 1, 1], data_type=i32, uid=uid)
    q = g.tensor(name="q", **layout(q_max, num_heads), data_type=io, uid=_Q)
    k = g.tensor(name="k", **layout(kv_max, num_kv_heads), data_type=io, uid=_K)
    v = g.tensor(name="v", **layout(kv_max, num_kv_heads), data_type=io, uid=_V)
    ragged_q, ragged_kv = ints("ragged_q", _RAGGED_Q, 2), ints("ragged_kv", _RAGGED_KV, 2)
    q.set_ragged_offset(ragged_q)
    k.set_ragged_offset(ragged_kv)
    v.set_ragged_offset(ragged_kv)
    o = g.sdpa(name="prefill", q=q, k=k, v=v, generate_stats=False, attn_scale=scale, use_padding_mask=True,
               seq_len_q=ints("seq_len_q", _SEQ_Q, 1), seq_len_kv=ints("seq_len_kv", _SEQ_KV, 1),
               diagonal_alignment=cudnn.diagonal_alignment.BOTTOM_RIGHT, diagonal_band_right_bound=0,
               compute_data_type=f32)[0]   # (out, stats): no stats asked for
    out = layout(q_max, num_heads)
    o.set_output(True).set_dim(out["dim"]).set_stride(out["stride"]).set_data_type(io).set_uid(_O)
    o.set_ragged_offset(ragged_q)
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans()
    return g, max(g.get_workspace_size(), 1)


def _handle(device: torch.device):
    """The device's cuDNN handle, bound to torch's current stream (steps run on one thread at a time)."""
    handle = _handles(device)
    _frontend().set_stream(handle=handle, stream=torch.cuda.current_stream(device).cuda_stream)
    return handle


@functools.cache
def _handles(device: torch.device):
    with torch.cuda.device(device):
        return _frontend().create_handle()


@functools.cache
def _frontend():
    """cuDNN's Python frontend (nvidia-cudnn-frontend), or None where it is not installed."""
    try:
        import cudnn
    except ImportError as e:
        logger.warning("cuDNN prefill off: nvidia-cudnn-frontend does not import (%s)", e)
        return None
    return cudnn


@torch.inference_mode()
def prebuild_plans(num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                   max_num_batched_tokens: int, max_model_len: int) -> int:
    """Builds the plan every row of the engine's limits uses (and runs it once), so that no step pays for it;
    returns the number of plans built (0: the path is off for this model or these limits)."""
    global ENABLED, KERNEL
    if not _usable(dtype, head_dim, device):
        return 0
    q_max = min(max_num_batched_tokens, max_model_len)
    if q_max < LONG_QUERY_LEN or q_max * max_model_len < MIN_PAIRS:   # no row gets here
        return 0
    if KERNEL != "cudnn" and fa4_prefill.interface() is not None:
        start = time.perf_counter()
        try:
            fa4_prefill.prebuild(num_q_heads, num_kv_heads, head_dim, dtype, device)
            KERNEL = "fa4"
            logger.info("FlashAttention-4 prefill: compiled in %.2f s", time.perf_counter() - start)
            return 1
        except Exception as e:   # the kernel refuses these heads or fails to compile: cuDNN takes the rows
            logger.warning("FlashAttention-4 prefill off (cuDNN's instead): %s", str(e).splitlines()[0][:300])
    KERNEL = "cudnn"
    if _frontend() is None:
        ENABLED = False
        return 0
    if max(q_max * num_q_heads, max_model_len * num_kv_heads) * head_dim >= 1 << 31:   # int32 ragged offsets
        ENABLED = False
        logger.warning("cuDNN prefill off: %d tokens x %d heads x %d overflow its int32 offsets", max_model_len,
                       num_kv_heads, head_dim)
        return 0
    start = time.perf_counter()
    _limits[:] = [q_max, max_model_len]
    try:
        n = LONG_QUERY_LEN
        q = torch.zeros(n, num_q_heads, head_dim, dtype=dtype, device=device)
        kv = torch.zeros(n, num_kv_heads, head_dim, dtype=dtype, device=device)
        lens = _lens(n, n, num_q_heads * head_dim, num_kv_heads * head_dim).to(device)
        _cudnn(q, kv, kv, torch.empty_like(q), lens, head_dim ** -0.5)
        torch.cuda.synchronize(device)
    except Exception as e:       # cuDNN refuses the graph (an old backend): the Triton kernel keeps every row
        ENABLED = False
        logger.warning("cuDNN prefill off: building its plan failed: %s", str(e).splitlines()[0][:300])
        return 0
    logger.info("cuDNN prefill: plan built in %.2f s (rows of %d+ new tokens, up to %d queries and %d keys)",
                time.perf_counter() - start, LONG_QUERY_LEN, q_max, max_model_len)
    return 1


def _usable(dtype: torch.dtype, head_dim: int, device: torch.device) -> bool:
    return (dtype in (torch.bfloat16, torch.float16) and head_dim in (64, 128) and ENABLED
            and device.type == "cuda" and _on_hopper(device))


def _on_hopper(device: torch.device) -> bool:
    """Measured on sm_90 only; elsewhere the Triton kernel stays. With a library to route rows to: cuDNN's
    frontend, or FA4 unless KERNEL is cudnn."""
    library = _frontend() if KERNEL == "cudnn" else fa4_prefill.interface() or _frontend()
    return _sm90(device) and library is not None


@functools.cache
def _sm90(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] == 9
