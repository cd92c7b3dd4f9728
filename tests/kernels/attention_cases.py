"""Random paged-attention batches and the checks of triton_backend against torch_backend.

Shared by the GPU tests and by the Triton-interpreter run on CPU (`python tests/kernels/attention_cases.py`
with TRITON_INTERPRET=1, which must be set before triton decorates the kernels, hence a process of its own).

A batch is a list of rows (seq_len, query_len) in random order: decode (ctx + 1, 1), chunked prefill or
prefix hit (ctx + L, L), fresh prompt (L, L), padding (0, 1) with slot -1. The cache is filled with noise,
block tables are shuffled block ids, and table entries a row must not read point far outside the cache
(the oracle gets a clean copy), so a stray read faults or shows up as a wrong answer.
"""
import random
import sys
from dataclasses import dataclass, replace

import torch
from kernel_checks import rel_error

from pagedllm.attention import torch_backend
from pagedllm.attention.metadata import AttentionMetadata

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 3e-3}
POISON_BLOCK = 1 << 28


@dataclass
class Batch:
    q: torch.Tensor
    k: torch.Tensor                   # this step's new K/V, (num_tokens, Hkv, D)
    v: torch.Tensor
    kv_cache: torch.Tensor            # context K/V already written; the new tokens not yet
    meta: AttentionMetadata           # what the kernels get: poisoned unused table entries
    ref_meta: AttentionMetadata       # what the oracle gets: unused entries 0
    padding: torch.Tensor             # (num_tokens,) bool: the token belongs to a padding row


def random_rows(rng: random.Random, num_rows: int, max_context: int, max_query: int,
                kinds=("decode", "chunk", "fresh", "padding")) -> list[tuple[int, int]]:
    rows = []
    for _ in range(num_rows):
        kind = rng.choice(kinds)
        if kind == "decode":
            rows.append((rng.randint(1, max_context) + 1, 1))
        elif kind == "chunk":
            query_len = rng.randint(2, max_query)
            rows.append((rng.randint(1, max_context) + query_len, query_len))
        elif kind == "fresh":
            query_len = rng.randint(2, max_query)
            rows.append((query_len, query_len))
        else:
            rows.append((0, 1))
    return rows


def make_batch(rows, num_q_heads, num_kv_heads, head_dim, block_size, dtype, device, seed=0,
               max_seq_len_bound=None, num_blocks=None, max_blocks=None, shared=()) -> Batch:
    """max_seq_len_bound: an upper bound to pass as max_seq_len; num_blocks, max_blocks: fixed sizes of the
    cache and of the block tables (as a CUDA graph's static buffers have), else just enough. shared:
    (rows, n) pairs: those rows' first n blocks are the first row's (a prefix-cache hit), n blocks of context."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_row = [-(-seq_len // block_size) for seq_len, _ in rows]
    num_blocks = num_blocks or sum(blocks_per_row) + 3
    free = torch.randperm(num_blocks, generator=gen).tolist()
    max_blocks = max_blocks or max(blocks_per_row) + 2
    tables = torch.full((len(rows), max_blocks), POISON_BLOCK, dtype=torch.int32)
    ref_tables = torch.zeros((len(rows), max_blocks), dtype=torch.int32)
    row_ids = [torch.tensor([free.pop() for _ in range(n)], dtype=torch.int32) for n in blocks_per_row]
    for group, n in shared:
        for i in group:
            assert n * block_size <= rows[i][0] - rows[i][1], "shared blocks must hold context only"
            row_ids[i][:n] = row_ids[group[0]][:n]
    slots, starts, padding = [], [0], []
    for i, (seq_len, query_len) in enumerate(rows):
        ids = row_ids[i]
        tables[i, :len(ids)] = ref_tables[i, :len(ids)] = ids
        if seq_len == 0:
            slots.append(-1)
        else:
            pos = torch.arange(seq_len - query_len, seq_len)
            slots.extend((ids.long()[pos // block_size] * block_size + pos % block_size).tolist())
        starts.append(starts[-1] + query_len)
        padding.extend([seq_len == 0] * query_len)
    num_tokens = starts[-1]
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    q = torch.randn(num_tokens, num_q_heads, head_dim, generator=gen).to(dtype)
    k, v = (torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype) for _ in range(2))
    seq_lens = [s for s, _ in rows]

    def meta(block_tables):
        return AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=block_tables.to(device), max_query_len=max(q for _, q in rows),
            max_seq_len=max_seq_len_bound or max(seq_lens), query_start_loc_cpu=starts, seq_lens_cpu=seq_lens)

    return Batch(q.to(device), k.to(device), v.to(device), cache.to(device), meta(tables), meta(ref_tables),
                 torch.tensor(padding, device=device))


def check_write_kv(batch: Batch, backend, kv_scales=(1.0, 1.0)) -> None:
    """Exact: new tokens land in their slots, padding slots (-1) leave the cache untouched (an fp8 cache:
    the same bytes)."""
    expected = batch.kv_cache.clone()
    torch_backend.write_kv(expected, batch.k, batch.v, batch.meta.slot_mapping, *kv_scales)
    got = batch.kv_cache.clone()
    backend.write_kv(got, batch.k, batch.v, batch.meta.slot_mapping, *kv_scales)
    assert torch.equal(_bytes(got), _bytes(expected)), "write_kv differs from torch_backend.write_kv"


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def check_attention(batch: Batch, backend, scale=None, kv_scales=(1.0, 1.0)) -> float:
    """triton vs torch on the cache after this step's write; padding rows must come out as zeros."""
    return checked_attention(batch, backend, scale, kv_scales)[0]


def checked_attention(batch: Batch, backend, scale=None, kv_scales=(1.0, 1.0)) -> tuple[float, torch.Tensor]:
    """check_attention's check; -> (its relative error, the backend's output), the output that
    check_row_independent_of_batch and check_graph_padding compare with (`out`): the interpreter need not
    compute it again for them."""
    scale = scale or batch.q.shape[-1] ** -0.5
    torch_backend.write_kv(batch.kv_cache, batch.k, batch.v, batch.meta.slot_mapping, *kv_scales)
    ref = torch_backend.paged_attention(batch.q, batch.kv_cache, batch.ref_meta, scale, *kv_scales)
    out = backend.paged_attention(batch.q, batch.kv_cache, batch.meta, scale, *kv_scales)
    return check_output(batch, out, ref), out


def check_output(batch: Batch, out: torch.Tensor, ref: torch.Tensor, what: str = "") -> float:
    """A backend's output for the batch against the reference's: q's shape and dtype, finite, padding rows zeros,
    the real rows within TOLERANCE; -> the relative error."""
    assert out.shape == batch.q.shape and out.dtype == batch.q.dtype
    assert torch.isfinite(out).all(), "non-finite attention output"
    assert (out[batch.padding] == 0).all(), "padding rows must be zeros"
    real = ~batch.padding
    err = rel_error(out[real], ref[real])
    assert err <= TOLERANCE[batch.q.dtype], f"{what}relative error {err:.2e} > {TOLERANCE[batch.q.dtype]:.0e}"
    return err


def check_row_independent_of_batch(batch: Batch, backend, row: int, kv_scales=(1.0, 1.0), out=None) -> None:
    """A decode row alone (with a looser max_seq_len) gives bit-identical output to the same row in the batch,
    when both steps cut rows into the same segments (triton_backend.decode_partition: a small decode-only step
    uses shorter ones; max_query_len 2, as a mixed step has, keeps the alone row on the batch's). out: the
    batch's output, if checked_attention computed it already."""
    from pagedllm.attention import triton_backend
    scale = batch.q.shape[-1] ** -0.5
    torch_backend.write_kv(batch.kv_cache, batch.k, batch.v, batch.meta.slot_mapping, *kv_scales)
    full = backend.paged_attention(batch.q, batch.kv_cache, batch.meta, scale, *kv_scales) if out is None else out
    m = batch.meta
    start = m.query_start_loc_cpu[row]
    assert m.query_start_loc_cpu[row + 1] - start == 1
    small = triton_backend.decode_partition(m) == triton_backend.SMALL_BATCH_PARTITION
    alone = AttentionMetadata(
        slot_mapping=m.slot_mapping[start:start + 1],
        query_start_loc=torch.tensor([0, 1], dtype=torch.int32, device=m.query_start_loc.device),
        seq_lens=m.seq_lens[row:row + 1], block_tables=m.block_tables[row:row + 1], max_query_len=1 if small else 2,
        max_seq_len=4 * m.max_seq_len, query_start_loc_cpu=[0, 1], seq_lens_cpu=[m.seq_lens_cpu[row]])
    single = backend.paged_attention(batch.q[start:start + 1], batch.kv_cache, alone, scale, *kv_scales)
    assert torch.equal(single[0], full[start]), "a decode row's output depends on its batch"


def check_graph_padding(batch: Batch, backend, extra_rows: int = 3, extra_tokens: int = 5,
                        kv_scales=(1.0, 1.0), out=None) -> None:
    """Padded as the runner pads a step for a CUDA graph (rows with no tokens after the real ones, tokens of
    no row with slot -1 after the real tokens, upper bounds for max_query_len and max_seq_len): every real
    token's output is bit-identical, and the cache is unchanged past the real tokens' slots. out: the unpadded
    step's output, if checked_attention computed it already."""
    scale = batch.q.shape[-1] ** -0.5
    backend.write_kv(batch.kv_cache, batch.k, batch.v, batch.meta.slot_mapping, *kv_scales)
    want = backend.paged_attention(batch.q, batch.kv_cache, batch.meta, scale, *kv_scales) if out is None else out
    m, num_tokens, dev = batch.meta, batch.q.shape[0], batch.q.device

    def pad(t, n, value):
        return torch.cat([t, torch.full((n, *t.shape[1:]), value, dtype=t.dtype, device=dev)])

    from pagedllm.attention import triton_backend
    if triton_backend.decode_partition(m) == triton_backend.SMALL_BATCH_PARTITION:
        # a small decode graph: max_query_len 1, rows padded to a capture size (never past SMALL_BATCH_ROWS)
        extra_rows, max_query_len = min(extra_rows, triton_backend.SMALL_BATCH_ROWS - len(m.seq_lens_cpu)), 1
    else:
        max_query_len = num_tokens + extra_tokens
    padded = AttentionMetadata(
        slot_mapping=pad(m.slot_mapping, extra_tokens, -1),
        query_start_loc=pad(m.query_start_loc, extra_rows, num_tokens),
        seq_lens=pad(m.seq_lens, extra_rows, 0), block_tables=pad(m.block_tables, extra_rows, POISON_BLOCK),
        max_query_len=max_query_len, max_seq_len=2 * m.max_seq_len,
        query_start_loc_cpu=m.query_start_loc_cpu + [num_tokens] * extra_rows,
        seq_lens_cpu=m.seq_lens_cpu + [0] * extra_rows)
    cache = batch.kv_cache.clone()
    backend.write_kv(batch.kv_cache, pad(batch.k, extra_tokens, 7.0), pad(batch.v, extra_tokens, 7.0),
                     padded.slot_mapping, *kv_scales)
    assert torch.equal(_bytes(cache), _bytes(batch.kv_cache)), "a padding token wrote to the cache"
    got = backend.paged_attention(pad(batch.q, extra_tokens, 1.0), batch.kv_cache, padded, scale, *kv_scales)
    assert torch.equal(got[:num_tokens], want), "graph padding changed a real token's output"


def shared_prefix_plan(batch: Batch, block_size: int, grid: int | None = None):
    """The runner's plan for the batch's decode rows, items padded with count-0 rows up to `grid`."""
    import numpy as np

    from pagedllm.attention.shared_prefix import SharedPrefixPlan, plan_shared_prefix
    from pagedllm.attention.triton_backend import shared_rows_per_item
    m, n = batch.meta, len(batch.meta.seq_lens_cpu)
    num_q_heads, num_kv_heads = batch.q.shape[1], batch.kv_cache.shape[3]
    per_item = shared_rows_per_item(batch.q.dtype, num_q_heads // num_kv_heads)
    first_seg, items, rows = np.zeros(n, np.int32), np.zeros((4 * n, 4), np.int32), np.zeros(n, np.int32)
    qsl = np.asarray(m.query_start_loc_cpu)
    k = plan_shared_prefix(m.block_tables.cpu().numpy(), np.diff(qsl), np.asarray(m.seq_lens_cpu), block_size,
                           per_item, len(items), first_seg, items, rows)
    dev = batch.q.device
    return SharedPrefixPlan(torch.from_numpy(first_seg).to(dev), torch.from_numpy(items[:grid or k]).to(dev),
                            torch.from_numpy(rows).to(dev), per_item), k


def check_shared_prefix(batch: Batch, backend, block_size: int, kv_scales=(1.0, 1.0)) -> float:
    """Rows sharing prefix blocks: with the plan (segments read once for a group) the output matches the
    oracle, is close to the per-row path, and padding the items (a graph's grid) changes nothing."""
    scale = batch.q.shape[-1] ** -0.5
    torch_backend.write_kv(batch.kv_cache, batch.k, batch.v, batch.meta.slot_mapping, *kv_scales)
    ref = torch_backend.paged_attention(batch.q, batch.kv_cache, batch.ref_meta, scale, *kv_scales)
    per_row = backend.paged_attention(batch.q, batch.kv_cache, batch.meta, scale, *kv_scales)
    plan, num_items = shared_prefix_plan(batch, block_size)
    assert num_items > 0, "no shared segment found"
    got = backend.paged_attention(batch.q, batch.kv_cache, replace(batch.meta, shared=plan), scale,
                                  *kv_scales)
    assert torch.isfinite(got).all() and (got[batch.padding] == 0).all()
    real = ~batch.padding
    err = rel_error(got[real], ref[real])
    assert err <= TOLERANCE[batch.q.dtype], f"shared prefix: relative error {err:.2e}"
    assert rel_error(got[real], per_row[real]) <= TOLERANCE[batch.q.dtype]
    padded, _ = shared_prefix_plan(batch, block_size, grid=num_items + 5)
    again = backend.paged_attention(batch.q, batch.kv_cache, replace(batch.meta, shared=padded), scale,
                                    *kv_scales)
    assert torch.equal(again, got), "count-0 items changed the output"
    return err


def shared_prefix_rows(rng: random.Random, prefix: int, groups: int, per_group: int, block_size: int):
    """Decode rows of `groups` prompts of `prefix` context tokens each, plus other rows; -> rows, shared."""
    rows, shared = random_rows(rng, 5, max_context=3 * prefix, max_query=20), []
    for _ in range(groups):
        members = []
        for _ in range(per_group):
            members.append(len(rows))
            rows.append((prefix + rng.randint(1, 40), 1))
        shared.append((members, prefix // block_size))
    rows.append((prefix + 5, 1))          # a lone row whose blocks are its own
    return rows, shared


# Small shapes for the interpreter: every feature, each kernel path, in well under a minute on 2 cores.
def interpreter_cases():
    rng = random.Random(0)
    for i, (hq, hkv, dim, bs, dtype) in enumerate([
            (4, 2, 16, 16, torch.float32), (4, 4, 32, 32, torch.float16), (6, 2, 16, 64, torch.bfloat16),
            (8, 1, 24, 16, torch.float32)]):
        rows = random_rows(rng, 6, max_context=80, max_query=20)
        rows += [(1, 1), (0, 1), (300, 1), (40, 7)]   # every kind at least once, one row of many segments
        rng.shuffle(rows)
        yield f"hq{hq}-hkv{hkv}-d{dim}-bs{bs}-{str(dtype)[6:]}", rows, (hq, hkv, dim, bs, dtype), i


def _patch_interpreter() -> None:
    """Two bugs of Triton 3.6's interpreter (not of the compiled kernels), fixed here for this process only:
    a scalar loop bound goes through int(1-element array), which numpy >= 2.4 refuses (triton-lang/triton
    #9171); tl.dot on bfloat16 multiplies the raw uint16 bits. Squeeze the one, upcast the other."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter
    patch_tensor, create_dot = interpreter._patch_lang_tensor, interpreter.InterpreterBuilder.create_dot

    def patched_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    def as_float32(x):
        if x.dtype != tl.bfloat16:
            return x
        return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def patched_dot(self, a, b, d, *args):
        return create_dot(self, as_float32(a), as_float32(b), d, *args)

    interpreter._patch_lang_tensor = patched_tensor
    interpreter.InterpreterBuilder.create_dot = patched_dot


def run_interpreter(cases: list[int] | None = None) -> None:
    """cases: the indices of interpreter_cases() to run (all by default)."""
    from pagedllm.attention import triton_backend
    _patch_interpreter()
    # Tiny segments, so that a 300-token row exercises many segments and the "longer segments" regime; small
    # decode-only steps' segments shorter than a tile
    triton_backend.PARTITION, triton_backend.MAX_SEGMENTS, triton_backend.SMALL_BATCH_PARTITION = 64, 4, 32
    for i, (name, rows, (hq, hkv, dim, bs, dtype), seed) in enumerate(interpreter_cases()):
        if cases is not None and i not in cases:   # drawn all the same: a case's rows do not depend on the others
            continue
        batch = make_batch(rows, hq, hkv, dim, bs, dtype, "cpu", seed=seed)
        check_write_kv(batch, triton_backend)
        # the batch's output once, for all three checks (each kernel call is seconds in the interpreter)
        err, out = checked_attention(batch, triton_backend)
        decode_row = next(i for i, (s, q) in enumerate(rows) if q == 1 and s > 0)
        check_row_independent_of_batch(batch, triton_backend, decode_row, out=out)
        check_graph_padding(batch, triton_backend, out=out)
        rows, shared = shared_prefix_rows(random.Random(seed), 2 * 64, groups=2, per_group=3, block_size=bs)
        check_shared_prefix(make_batch(rows, hq, hkv, dim, bs, dtype, "cpu", seed=seed, shared=shared),
                            triton_backend, bs)
        # a small decode-only step (batch-1 decode, a speculative verify): its own, shorter segments
        small = make_batch([(300, 1), (1, 1), (0, 1), (77, 1), (150, 1)], hq, hkv, dim, bs, dtype, "cpu", seed=seed)
        assert triton_backend.decode_partition(small.meta) == triton_backend.SMALL_BATCH_PARTITION
        small_err, out = checked_attention(small, triton_backend)
        err = max(err, small_err)
        check_row_independent_of_batch(small, triton_backend, 0, out=out)
        check_graph_padding(small, triton_backend, out=out)
        print(f"ok {name} rel_err={err:.1e}", flush=True)


if __name__ == "__main__":
    run_interpreter([int(a) for a in sys.argv[1:]] or None)


def check_graph_replay_equals_eager(backend, num_rows: int, max_context: int, **layer) -> None:
    """A decode batch captured once with max_seq_len = max_model_len (an upper bound), replayed on new data,
    equals eager with the exact max_seq_len, bit for bit; padding rows included. layer: paged_attention's
    keyword arguments (a sliding window sizes the scratch: it must not change a row's segments)."""
    rng, scale = random.Random(num_rows), 128 ** -0.5
    max_model_len, block_size = 8192, 16
    batches_rows = []
    for _ in range(3):
        rows = random_rows(rng, num_rows, max_context=max_context, max_query=1,
                           kinds=("decode", "decode", "padding"))
        rows[0] = (rng.randint(2, max_model_len), 1)
        batches_rows.append(rows)
    sizes = {"num_blocks": max(sum(-(-s // block_size) for s, _ in r) for r in batches_rows) + 3,
             "max_blocks": max_model_len // block_size, "max_seq_len_bound": max_model_len}
    batches = [make_batch(r, 16, 8, 128, block_size, torch.bfloat16, "cuda", seed=i, **sizes)
               for i, r in enumerate(batches_rows)]
    static = batches[0]
    backend.write_kv(static.kv_cache, static.k, static.v, static.meta.slot_mapping)
    backend.paged_attention(static.q, static.kv_cache, static.meta, scale, **layer)   # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        backend.write_kv(static.kv_cache, static.k, static.v, static.meta.slot_mapping)
        graph_out = backend.paged_attention(static.q, static.kv_cache, static.meta, scale, **layer)
    for new in batches[1:]:
        for name in ("q", "k", "v", "kv_cache"):
            getattr(static, name).copy_(getattr(new, name))
        for name in ("slot_mapping", "query_start_loc", "seq_lens", "block_tables"):
            getattr(static.meta, name).copy_(getattr(new.meta, name))
        graph.replay()
        exact = replace(new.meta, max_seq_len=max(new.meta.seq_lens_cpu))
        eager = backend.paged_attention(new.q, static.kv_cache, exact, scale, **layer)
        assert torch.isfinite(graph_out).all()
        assert (graph_out[new.padding] == 0).all()
        assert torch.equal(graph_out, eager), "graph replay differs from eager"
