"""prepass_inputs (spec_decode/prepass_inputs.py) in one Triton launch: same rows, same four buffers."""
import torch
import triton
import triton.language as tl

_BLOCK = 64


# Nothing specialised on values (ints equal to 1 or multiples of 16; pointers' 16-byte alignment: the rows'
# lengths, proposals and limits are views of one copy, aligned or not by the row count), so that no step compiles
# a new binary in the middle of a run: DraftModel.allocate compiles both layouts once.
_POINTERS = ["tokens_ptr", "num_emitted_ptr", "base_ptr", "spec_ptr", "limit_ptr", "table_ptr", "prev_ids_ptr",
             "input_ids_ptr", "positions_ptr", "slot_mapping_ptr", "seq_lens_ptr"]


@triton.jit(do_not_specialize=["num_rows", "j", "stride_tokens", "stride_table", "max_blocks"],
            do_not_specialize_on_alignment=_POINTERS)
def prepass_inputs_kernel(
    tokens_ptr, num_emitted_ptr, base_ptr, spec_ptr, limit_ptr, table_ptr, prev_ids_ptr,
    input_ids_ptr, positions_ptr, slot_mapping_ptr, seq_lens_ptr,
    num_rows, j, stride_tokens, stride_table, max_blocks,
    BLOCK_SIZE: tl.constexpr, PAIRS: tl.constexpr, BLOCK: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = r < num_rows
    if PAIRS:
        q = r // 2
    else:
        q = r
    m = tl.load(num_emitted_ptr + q, mask=ok, other=1).to(tl.int64)
    base = tl.load(base_ptr + q, mask=ok, other=0)
    limit = tl.load(limit_ptr + q, mask=ok, other=0)
    pos_last = base + m - 1
    if PAIRS:
        spec = tl.load(spec_ptr + q, mask=ok, other=1)
        first_of_all = (r % 2 == 0) & (m == spec + 1)          # row 2q of a fully accepted draft: e_s
        pos = tl.where(first_of_all, base + spec - 1, pos_last)
        col = tl.where(first_of_all, spec - 1, m - 1)
        tok = tl.load(tokens_ptr + q.to(tl.int64) * stride_tokens + col, mask=ok, other=0).to(tl.int64)
        fits = pos_last < limit
    else:
        pos = pos_last + j
        tok = tl.load(prev_ids_ptr + q, mask=ok, other=0).to(tl.int64)
        fits = pos < limit
    block_index = tl.minimum(pos // BLOCK_SIZE, max_blocks - 1)
    block = tl.load(table_ptr + q.to(tl.int64) * stride_table + block_index, mask=ok, other=0).to(tl.int64)
    tl.store(input_ids_ptr + r, tl.where(fits, tok, 0), mask=ok)
    tl.store(positions_ptr + r, tl.where(fits, pos, 0), mask=ok)
    tl.store(slot_mapping_ptr + r, tl.where(fits, block * BLOCK_SIZE + pos % BLOCK_SIZE, -1), mask=ok)
    tl.store(seq_lens_ptr + r, tl.where(fits, pos + 1, 1).to(tl.int32), mask=ok)


def prepass_inputs_cuda(buffers, tokens, num_emitted, base, spec, limit, table, prev_ids, j: int,
                        block_size: int) -> int:
    pairs = j == 0
    k = num_emitted.shape[0] * (2 if pairs else 1)
    # contiguous() is the tensor itself when it already is (the engine's are): no copy on the hot path
    tokens, num_emitted, table = tokens.contiguous(), num_emitted.contiguous(), table.contiguous()
    prev_ids = tokens if pairs else prev_ids.contiguous()
    b = buffers
    if b.seq_lens.dtype != torch.int32 or b.input_ids.dtype != torch.int64:
        raise ValueError("prepass_inputs: buffers of unexpected dtypes")
    prepass_inputs_kernel[(triton.cdiv(k, _BLOCK),)](
        tokens, num_emitted, base.contiguous(), spec.contiguous(), limit.contiguous(), table, prev_ids,
        b.input_ids, b.positions, b.slot_mapping, b.seq_lens,
        k, j, tokens.stride(0), table.stride(0), table.shape[1],
        BLOCK_SIZE=block_size, PAIRS=pairs, BLOCK=_BLOCK)
    return k


def compile_prepass_inputs(buffers, block_size: int, device: torch.device):
    """Both layouts' binaries built before the first request (they overwrite buffers' first rows)."""
    one = torch.ones(1, dtype=torch.int64, device=device)
    tokens = torch.zeros((1, 2), dtype=torch.int64, device=device)
    table = torch.zeros((1, 1), dtype=torch.int32, device=device)
    for j in (0, 1):
        prepass_inputs_cuda(buffers, tokens, one, one, one, one, table, one, j, block_size)
