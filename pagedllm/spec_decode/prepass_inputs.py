"""The inputs of one pass of DraftModel.prepass, made on the device from the verify's emitted tokens.

Row r of a pass's layout feeds one token at one position of request q:
  pairs (the first pass): q = r // 2. Row 2q feeds e_s at its position when the verify accepted all s proposals
      (the draft never fed it), else a copy of row 2q + 1; row 2q + 1 feeds the last emitted token.
  later passes (pass j >= 1): q = r, the token the pass before proposed, at the last emitted position + j.
A request whose position has no slot (at or past `limit`, the end of its blocks) feeds token 0 at position 0 with
slot -1 and seq_len 1: it writes nothing and reads its first block.

`prepass_inputs_torch` is the definition (the CPU path and the kernel's test oracle). On CUDA the Triton kernel
writes the same four buffers in one launch; in torch ops that was ~15 small kernels a pass (H100 timeline: the
4 passes' device time 5.34 ms a step against 5.04 for their graph replays and LM heads).
H100, session 43: W5 speculating 3.448 ms/token against 3.513 / 3.518 with the torch ops.
"""
import torch

from pagedllm.lazy_kernel import lazy_kernel

prepass_inputs_cuda = lazy_kernel(globals(), "pagedllm.spec_decode.prepass_kernel", "prepass_inputs_cuda")


def prepass_inputs(buffers, tokens: torch.Tensor, num_emitted: torch.Tensor, base: torch.Tensor,
                   spec: torch.Tensor, limit: torch.Tensor, table: torch.Tensor, prev_ids: torch.Tensor | None,
                   j: int, block_size: int) -> int:
    """Write the pass's rows into buffers' input_ids, positions, slot_mapping and seq_lens; their count.
    tokens (R, w) and num_emitted (R,): the verify's; base, spec, limit (R,) int64: each request's known tokens,
    proposals and slots when it launched; table (R, max_blocks) int32; prev_ids (R,): pass j - 1's proposals."""
    fn = prepass_inputs_cuda if tokens.is_cuda else prepass_inputs_torch
    return fn(buffers, tokens, num_emitted, base, spec, limit, table, prev_ids, j, block_size)


def prepass_inputs_torch(buffers, tokens, num_emitted, base, spec, limit, table, prev_ids, j: int,
                         block_size: int) -> int:
    m = num_emitted.to(torch.int64)
    pos_last = base + m - 1
    if j == 0:
        idx = torch.arange(m.shape[0], device=m.device)
        tok_last = tokens[idx, m - 1]
        all_accepted = m == spec + 1
        pos_first = torch.where(all_accepted, base + spec - 1, pos_last)
        tok_first = torch.where(all_accepted, tokens[idx, spec - 1], tok_last)
        pos = torch.stack([pos_first, pos_last], 1).view(-1)
        tok = torch.stack([tok_first, tok_last], 1).view(-1)
        fits = (pos_last < limit).repeat_interleave(2)
        table = table.repeat_interleave(2, 0)
    else:
        pos, tok = pos_last + j, prev_ids
        fits = pos < limit
    k, b = pos.shape[0], buffers
    block = table.gather(1, (pos // block_size).clamp(max=table.shape[1] - 1)[:, None])[:, 0].to(torch.int64)
    b.input_ids[:k] = torch.where(fits, tok, 0)
    b.positions[:k] = torch.where(fits, pos, 0)
    b.slot_mapping[:k] = torch.where(fits, block * block_size + pos % block_size, -1)
    b.seq_lens[:k] = torch.where(fits, pos + 1, 1)
    return k
