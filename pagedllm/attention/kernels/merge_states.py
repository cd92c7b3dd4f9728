"""Merge two partial attention results over disjoint key sets into one (the cuDNN long-prefill path).

Each part i gives, per query token and head, its normalized output o_i and the log-sum-exp lse_i (natural log)
of its scaled scores. Over the union of the keys:

    out = (o_a * e^(lse_a - M) + o_b * e^(lse_b - M)) / (e^(lse_a - M) + e^(lse_b - M)),   M = max(lse_a, lse_b)

times v_scale (an fp8 cache's V scale; 1.0 otherwise), before the one rounding to out's dtype. With WRITE_LSE
it also writes the union's log-sum-exp, M + log(e^(lse_a - M) + e^(lse_b - M)), so that three or more parts fold
in one kernel a part: out may be a (an fp32 accumulator) and lse_out lse_a, since each program reads its own
token's head before writing it.

Grid (num_tokens, num_heads): one program writes one token's head.
"""
import triton
import triton.language as tl


@triton.jit
def merge_states_kernel(
    out_ptr, a_ptr, b_ptr, lse_a_ptr, lse_b_ptr, lse_out_ptr, v_scale,
    stride_o_tok, stride_o_head, stride_a_tok, stride_a_head, stride_b_tok, stride_b_head,
    stride_lse_a_head, stride_lse_b_head, stride_lse_out_head,
    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, WRITE_LSE: tl.constexpr,
):
    tok, head = tl.program_id(0).to(tl.int64), tl.program_id(1)
    dims = tl.arange(0, HEAD_PAD)
    dim_ok = dims < HEAD_DIM
    lse_a = tl.load(lse_a_ptr + head * stride_lse_a_head + tok)
    lse_b = tl.load(lse_b_ptr + head * stride_lse_b_head + tok)
    m = tl.maximum(lse_a, lse_b)
    wa, wb = tl.exp(lse_a - m), tl.exp(lse_b - m)
    a = tl.load(a_ptr + tok * stride_a_tok + head * stride_a_head + dims, mask=dim_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + tok * stride_b_tok + head * stride_b_head + dims, mask=dim_ok, other=0.0).to(tl.float32)
    out = (a * wa + b * wb) * (v_scale / (wa + wb))
    tl.store(out_ptr + tok * stride_o_tok + head * stride_o_head + dims, out.to(out_ptr.dtype.element_ty),
             mask=dim_ok)
    if WRITE_LSE:
        tl.store(lse_out_ptr + head * stride_lse_out_head + tok, m + tl.log(wa + wb))
