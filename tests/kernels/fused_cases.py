"""The fused layer kernels (pagedllm/layers/kernels) against the torch code they replace, on fresh random inputs.

Shared by the GPU tests and by the Triton-interpreter run on CPU (`python tests/kernels/fused_cases.py` with
TRITON_INTERPRET=1, which must be set before triton decorates the kernels, hence a process of its own).

Oracle: the layer's forward_native in float32 on the float32 copy of the same inputs and weights.
float32 must match it to ~1e-6 relative; a half dtype may be off by no more than the torch code run in that
dtype is (x 1.5, + 1e-5). Gemma's norms (unit_offset: the normed row times (1 + weight) in float32, rounded once)
are also held to the torch code's rounding: a half-dtype output equals the torch code's in that dtype but where
the variance's summation order moves a value across a rounding boundary (check_same_rounding).
Inputs are rows of wider NaN-filled buffers (a stray read shows up as NaN) and the allocator is filled with NaN
before each call (best effort: an unwritten output shows up as NaN).
GeGLU (silu_and_mul's gelu_tanh) is held to the torch code's bits on CUDA (the same tanhf); under the interpreter
tanh is numpy's, an ulp off torch's CPU one at times (check_gelu_and_mul's bound).
"""
from types import SimpleNamespace

import torch
from kernel_checks import rel_error

from pagedllm.attention.triton_backend import write_kv
from pagedllm.layers.activation import GeluTanhAndMul, SiluAndMul
from pagedllm.layers.kernels.fused_quant_fp8 import silu_and_mul_quant_fp8
from pagedllm.layers.kernels.qk_norm_rope import qk_norm_rope
from pagedllm.layers.kernels.quant_fp8 import per_token_quant_fp8
from pagedllm.layers.kernels.rms_norm import rms_norm
from pagedllm.layers.kernels.silu_and_mul import silu_and_mul
from pagedllm.layers.norm import RMSNorm
from pagedllm.layers.rotary import RotaryEmbedding
from pagedllm.models.gemma import GemmaRMSNorm
from pagedllm.models.llama import LlamaAttention

FLOAT32_TOLERANCE = 1e-6
MAX_POSITION = 4096


def check_close(name: str, out: torch.Tensor, half: torch.Tensor, ref: torch.Tensor) -> float:
    """out: fused in dtype; half: torch code in dtype; ref: torch code in float32."""
    assert out.shape == ref.shape and out.dtype == half.dtype, f"{name}: {out.shape} {out.dtype} vs {ref.shape}"
    assert torch.isfinite(out).all(), f"{name}: non-finite output"
    err = rel_error(out, ref)
    limit = FLOAT32_TOLERANCE if out.dtype == torch.float32 else 1.5 * rel_error(half, ref) + 1e-5
    assert err <= limit, f"{name}: relative error {err:.2e} > {limit:.2e}"
    return err


def check_same_rounding(name: str, out: torch.Tensor, half: torch.Tensor, max_share: float = 0.01) -> None:
    """out and the torch code's half (same dtype) differ in at most max_share of the values (float32: any share).
    Gemma's one rounding at the end keeps nearly all equal (the interpreter's bf16 / fp16 cases: all); rounding
    the normed row first too, as Llama's norm does, changes 22-33% of them, which the error bound lets pass."""
    if out.dtype != torch.float32:
        share = (out != half).float().mean().item()
        assert share <= max_share, f"{name}: {share:.1%} of the values differ from the torch code's rounding"


def poisoned_rows(values: torch.Tensor, pad: int = 13) -> torch.Tensor:
    """values (T, C) copied into the first C columns of a NaN-filled (T, C + pad) buffer."""
    buf = torch.full((values.shape[0], values.shape[1] + pad), float("nan"), dtype=values.dtype, device=values.device)
    buf[:, :values.shape[1]] = values
    return buf[:, :values.shape[1]]


def poison_allocator(device, num_bytes: int) -> None:
    """Hand a few NaN-filled blocks of this size back to the allocator, for the next outputs to land in."""
    blocks = [torch.full((num_bytes // 4 + 1,), float("nan"), device=device) for _ in range(4)]
    del blocks


def _randn(shape, dtype, device, gen, scale=1.0):
    return (torch.randn(shape, generator=gen) * scale).to(device=device, dtype=dtype)


@torch.no_grad()
def check_rms_norm(num_tokens, hidden, dtype, with_residual, device, seed=0, gemma=False) -> float:
    """gemma: GemmaRMSNorm's arithmetic (rms_norm's unit_offset), weights Gemma's offsets from 1."""
    gen = torch.Generator().manual_seed(seed)
    x = poisoned_rows(_randn((num_tokens, hidden), dtype, device, gen, 3.0))
    residual = poisoned_rows(_randn((num_tokens, hidden), dtype, device, gen)) if with_residual else None
    norm_cls = GemmaRMSNorm if gemma else RMSNorm
    norm = norm_cls(hidden, eps=1e-6).to(device)
    norm.weight.data = _randn((hidden,), dtype, device, gen, 0.2) + (0 if gemma else 1)
    ref_norm = norm_cls(hidden, eps=1e-6).to(device)
    ref_norm.weight.data = norm.weight.data.float()
    args = (x,) if residual is None else (x, residual)
    half, ref = norm.forward_native(*args), ref_norm.forward_native(*(a.float() for a in args))
    poison_allocator(device, x.numel() * x.element_size())
    out = rms_norm(x, norm.weight, norm.variance_epsilon, residual, **({"unit_offset": True} if gemma else {}))
    if residual is not None:
        assert torch.equal(out[1], half[1]), "rms_norm: residual sum differs from x + residual"
        out, half, ref = out[0], half[0], ref[0]
    if gemma:
        check_same_rounding("rms_norm", out, half)
    return check_close("rms_norm", out, half, ref)


@torch.no_grad()
def check_silu_and_mul(num_tokens, inter, dtype, device, seed=0) -> float:
    gen = torch.Generator().manual_seed(seed)
    gate_up = poisoned_rows(_randn((num_tokens, 2 * inter), dtype, device, gen, 4.0))
    half, ref = SiluAndMul().forward_native(gate_up), SiluAndMul().forward_native(gate_up.float())
    poison_allocator(device, half.numel() * half.element_size())
    return check_close("silu_and_mul", silu_and_mul(gate_up), half, ref)


@torch.no_grad()
def check_gelu_and_mul(num_tokens, inter, dtype, device, seed=0) -> float:
    """On CUDA the torch code's bits (its formula, fma and tanhf). Elsewhere tanh may be an ulp (<= 2^-24) off,
    which 1 + tanh's cancellation for gate < ~-3 passes on whole: the value may be off by |gate * up| * 2^-22
    (the ulp and the float32 roundings after it), each of the two roundings to dtype may go the other way
    (2 eps |half|), and fp16's tail is subnormal (a step there, after the gelu and after the product).
    Above gate -2 such an ulp seldom moves a rounding: a half dtype's values are the torch code's but <= 0.1%
    (one rounding instead of two: 13% differ there, the erf GeLU 4-17%)."""
    gen = torch.Generator().manual_seed(seed)
    gate_up = poisoned_rows(_randn((num_tokens, 2 * inter), dtype, device, gen, 4.0))
    half, ref = GeluTanhAndMul().forward_native(gate_up), GeluTanhAndMul().forward_native(gate_up.float())
    poison_allocator(device, half.numel() * half.element_size())
    out = silu_and_mul(gate_up, "gelu_tanh")
    if device == "cuda":
        assert torch.equal(out, half), f"gelu_and_mul: {(out != half).float().mean():.2%} differ from torch's bits"
    else:
        gate, up = (t.double() for t in gate_up.chunk(2, dim=-1))
        info = torch.finfo(dtype)
        bound = 2 ** -22 * (gate * up).abs() + 2 * info.eps * half.double().abs() + \
            info.smallest_normal * info.eps * (up.abs() + 1)
        over = ((out.double() - half.double()).abs() > bound).sum().item()
        assert over == 0, f"gelu_and_mul: {over} values beyond tanh's ulp and the roundings"
        no_cancel = gate > -2
        check_same_rounding("gelu_and_mul", out[no_cancel], half[no_cancel], max_share=1e-3)
    return check_close("gelu_and_mul", out, half, ref)


@torch.no_grad()
def check_act_and_mul_quant(num_tokens, inter, dtype, act, device, seed=0) -> float:
    """The fused fp8 kernel's bytes are those of silu_and_mul then the quant kernel (the interpreter's fp8 cast
    is no oracle, but both sides take the same one)."""
    gen = torch.Generator().manual_seed(seed)
    gate_up = poisoned_rows(_randn((num_tokens, 2 * inter), dtype, device, gen, 4.0))
    q, scale = silu_and_mul_quant_fp8(gate_up, act)
    ref_q, ref_scale = per_token_quant_fp8(silu_and_mul(gate_up, act))
    assert torch.equal(scale, ref_scale), f"{act}_and_mul_quant: scales differ"
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)), f"{act}_and_mul_quant: fp8 bytes differ"
    return 0.0


def make_attention(num_q_heads, num_kv_heads, head_dim, qk_norm, device, max_position=MAX_POSITION,
                   gemma=False) -> LlamaAttention:
    """A LlamaAttention whose projections go unused here (rotate_qk takes the qkv output); its rotary table
    covers positions below max_position. gemma: its q/k norms are Gemma 3's (GemmaRMSNorm, as gemma3.py sets)."""
    config = SimpleNamespace(num_attention_heads=num_q_heads, num_key_value_heads=num_kv_heads, head_dim=head_dim,
                             hidden_size=64, rms_norm_eps=1e-6, attention_bias=False)
    rotary = RotaryEmbedding(head_dim, max_position, {"rope_type": "default", "rope_theta": 1e6})
    attn = LlamaAttention(config, 0, rotary, qkv_bias=False, qk_norm=qk_norm or gemma)
    if gemma:
        attn.q_norm, attn.k_norm = GemmaRMSNorm(head_dim, eps=1e-6), GemmaRMSNorm(head_dim, eps=1e-6)
    return attn.to(device)


def norm_weight(head_dim, dtype, device, gen, gemma=False) -> torch.Tensor:
    """A q/k norm's weight: about 1 (Llama's), or Gemma's offset from 1 about 0."""
    return _randn((head_dim,), dtype, device, gen, 0.2) + (0 if gemma else 1)


@torch.no_grad()
def check_qk_norm_rope(num_tokens, num_q_heads, num_kv_heads, head_dim, dtype, qk_norm, device, seed=0, gemma=False):
    """gemma: Gemma 3's q/k norms, through the layer's own kernel call (LlamaAttention.rotate_qk sets the flag)."""
    gen = torch.Generator().manual_seed(seed)
    attn, ref_attn = (make_attention(num_q_heads, num_kv_heads, head_dim, qk_norm, device, gemma=gemma)
                      for _ in range(2))
    if qk_norm or gemma:
        for name in ("q_norm", "k_norm"):
            weight = norm_weight(head_dim, dtype, device, gen, gemma)
            getattr(attn, name).weight.data, getattr(ref_attn, name).weight.data = weight, weight.float()
    width = (num_q_heads + 2 * num_kv_heads) * head_dim
    qkv = poisoned_rows(_randn((num_tokens, width), dtype, device, gen, 2.0))
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), generator=gen).to(device)
    half = attn.rotate_qk_native(positions, qkv)
    ref = ref_attn.rotate_qk_native(positions, qkv.float())
    poison_allocator(device, qkv.numel() * qkv.element_size())
    if gemma:
        q, k, v = attn.rotate_qk(positions, qkv)
        check_same_rounding("q", q, half[0])
        check_same_rounding("k", k, half[1])
    else:
        norms = [(n.weight, n.variance_epsilon) for n in (attn.q_norm, attn.k_norm)] if qk_norm else [None, None]
        q, k, v = qk_norm_rope(qkv, positions, attn.rotary_emb.cos_sin_cache, num_q_heads, num_kv_heads, head_dim,
                               *norms)
    assert torch.equal(v, half[2]), "qk_norm_rope: v must be qkv's v columns"
    return max(check_close("q", q, half[0], ref[0]), check_close("k", k, half[1], ref[1]))


@torch.no_grad()
def check_qk_norm_rope_cache(num_tokens, num_q_heads, num_kv_heads, head_dim, dtype, cache_dtype, device,
                             scales=(1.0, 1.0), block_size=4, seed=0, gemma=False) -> float:
    """The cache-writing kernel: q as without the cache, and the cache's bytes those reshape_and_cache writes from
    the k and v the kernel returns without it (slot -1 rows and other slots untouched). gemma: Gemma 3's norms."""
    gen = torch.Generator().manual_seed(seed)
    attn = make_attention(num_q_heads, num_kv_heads, head_dim, True, device, gemma=gemma)
    for name in ("q_norm", "k_norm"):
        getattr(attn, name).weight.data = norm_weight(head_dim, dtype, device, gen, gemma)
    norms = [(n.weight, n.variance_epsilon) for n in (attn.q_norm, attn.k_norm)]
    width = (num_q_heads + 2 * num_kv_heads) * head_dim
    qkv = poisoned_rows(_randn((num_tokens, width), dtype, device, gen, 2.0))
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), generator=gen).to(device)
    num_blocks = num_tokens // block_size + 2
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::3] = -1                                                   # padding rows
    slots = slots.to(device)
    cache = _randn((2, num_blocks, block_size, num_kv_heads, head_dim), torch.float32, device, gen).to(cache_dtype)
    expected = cache.clone()
    args = (qkv, positions, attn.rotary_emb.cos_sin_cache, num_q_heads, num_kv_heads, head_dim, *norms)
    kw = {"unit_offset": True} if gemma else {}
    q_ref, k, v = qk_norm_rope(*args, **kw)
    write_kv(expected, k.view(num_tokens, num_kv_heads, head_dim), v.reshape(num_tokens, num_kv_heads, head_dim),
             slots, k_scale=scales[0], v_scale=scales[1])
    q, k_none, v_none = qk_norm_rope(*args, kv_cache=cache, slot_mapping=slots, k_scale=scales[0],
                                     v_scale=scales[1], **kw)
    assert k_none is None and v_none is None, "qk_norm_rope: with a cache, k and v are not returned"
    assert torch.equal(q, q_ref), "qk_norm_rope: q differs when the cache is written"
    differ = (cache.view(torch.uint8) != expected.view(torch.uint8)).sum().item()
    assert differ == 0, f"qk_norm_rope: {differ} cache bytes differ from reshape_and_cache's"
    return 0.0


# Small shapes for the interpreter: every kernel, dtype and switch, odd sizes, in seconds on 2 cores.
def interpreter_cases():
    for i, dtype in enumerate([torch.float32, torch.bfloat16, torch.float16]):
        yield f"rms_norm-{dtype}", lambda d=dtype, i=i: check_rms_norm(7, 96, d, False, "cpu", seed=i)
        yield f"rms_norm+res-{dtype}", lambda d=dtype, i=i: check_rms_norm(5, 80, d, True, "cpu", seed=i)
        yield f"silu_and_mul-{dtype}", lambda d=dtype, i=i: check_silu_and_mul(3, 1100, d, "cpu", seed=i)
        yield f"gelu_and_mul-{dtype}", lambda d=dtype, i=i: check_gelu_and_mul(16, 1100, d, "cpu", seed=i)
        for act in ("silu", "gelu_tanh"):
            yield f"{act}_and_mul_quant-{dtype}", lambda d=dtype, a=act, i=i: check_act_and_mul_quant(3, 1100, d, a,
                                                                                                   "cpu", seed=i)
        yield f"qk_norm_rope-{dtype}", lambda d=dtype, i=i: check_qk_norm_rope(5, 4, 2, 32, d, True, "cpu", seed=i)
        yield f"rope-{dtype}", lambda d=dtype, i=i: check_qk_norm_rope(3, 6, 2, 16, d, False, "cpu", seed=i)
    for i, dtype in enumerate([torch.float32, torch.bfloat16, torch.float16]):   # Gemma's (1 + weight) norms
        yield f"gemma_rms_norm-{dtype}", lambda d=dtype, i=i: check_rms_norm(7, 96, d, False, "cpu", i, gemma=True)
        yield f"gemma_rms_norm+res-{dtype}", lambda d=dtype, i=i: check_rms_norm(5, 80, d, True, "cpu", i, gemma=True)
        yield f"gemma_qk_norm_rope-{dtype}", lambda d=dtype, i=i: check_qk_norm_rope(5, 4, 2, 32, d, True, "cpu", i,
                                                                                       gemma=True)
    yield "gemma_qk_norm_rope+cache-bf16", lambda: check_qk_norm_rope_cache(9, 6, 2, 16, torch.bfloat16,
                                                                            torch.bfloat16, "cpu", seed=30, gemma=True)
    yield "qk_norm_rope-d24", lambda: check_qk_norm_rope(2, 3, 1, 24, torch.float32, True, "cpu", seed=9)
    yield "qk_norm_rope-d80-bf16", lambda: check_qk_norm_rope(3, 12, 4, 80, torch.bfloat16, True, "cpu", seed=10)
    for i, (dtype, cache_dtype, scales) in enumerate([
            (torch.float32, torch.float32, (1.0, 1.0)), (torch.bfloat16, torch.bfloat16, (1.0, 1.0)),
            (torch.float16, torch.float8_e4m3fn, (0.43, 2.7)), (torch.bfloat16, torch.float8_e4m3fn, (1.0, 1.0))]):
        yield (f"qk_norm_rope+cache-{dtype}-{cache_dtype}",
               lambda d=dtype, c=cache_dtype, s=scales, i=i: check_qk_norm_rope_cache(9, 6, 2, 16, d, c, "cpu", s,
                                                                                        seed=20 + i))


def _patch_interpreter() -> None:
    """A bug of Triton 3.6's interpreter (not of compiled kernels, where fptrunc rounds to nearest even), fixed
    here for this process only: float32 -> bfloat16 casts truncate. Round to nearest even instead. And a tanh."""
    import numpy as np
    import triton.language as tl
    from triton.language.extra.cuda import libdevice
    from triton.runtime import interpreter
    cast_impl = interpreter.InterpreterBuilder.cast_impl

    def patched_cast(self, src, dst_type):
        if src.dtype.scalar != tl.float32 or dst_type.scalar != tl.bfloat16:
            return cast_impl(self, src, dst_type)
        bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        rounded = np.where(np.isnan(src.data), np.uint16(0x7FC0), rounded)
        return interpreter.TensorHandle(rounded, tl.bfloat16)

    interpreter.InterpreterBuilder.cast_impl = patched_cast
    # No libdevice under the interpreter: GeGLU's tanhf is numpy's here (check_gelu_and_mul's bound)
    libdevice.tanh = lambda x: tl.tensor(interpreter.TensorHandle(np.tanh(x.handle.data), tl.float32), x.type)


def run_interpreter() -> None:
    _patch_interpreter()
    for name, check in interpreter_cases():
        print(f"ok {name} rel_err={check():.1e}", flush=True)


if __name__ == "__main__":
    run_interpreter()
