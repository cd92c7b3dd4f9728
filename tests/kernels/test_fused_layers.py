"""Fused RMSNorm(+residual), q/k norm + rotary, SiLU- and GeGLU-and-mul against the torch code they replace: on CUDA,
and on CPU through the Triton interpreter in a subprocess (TRITON_INTERPRET is read when kernels are decorated)."""

import pytest
import torch
from fused_cases import (
    check_qk_norm_rope,
    check_qk_norm_rope_cache,
    check_gelu_and_mul,
    check_rms_norm,
    check_silu_and_mul,
    interpreter_cases,
    make_attention,
)
from kernel_checks import run_under_interpreter

from pagedllm.layers.activation import GeluTanhAndMul, SiluAndMul
from pagedllm.layers.kernels.qk_norm_rope import qk_norm_rope
from pagedllm.layers.kernels.rms_norm import rms_norm
from pagedllm.layers.kernels.silu_and_mul import silu_and_mul
from pagedllm.layers.norm import RMSNorm

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NUM_TOKENS = [1, 7, 256, 3000]


def test_kernels_under_triton_interpreter():
    pytest.importorskip("triton")
    stdout = run_under_interpreter("fused_cases.py", timeout=300)
    assert stdout.count("ok ") == len(list(interpreter_cases())), stdout


def _arg_type(name: str) -> str:
    """A norm kernel argument's Triton type for a bf16 model: tensors bf16 but positions, slots and the rotary
    table; scalars int32 but the float ones."""
    if name in ("pos_ptr", "slot_ptr"):
        return "*i64"
    if name == "cos_sin_ptr":
        return "*fp32"
    if name.endswith("_ptr"):
        return "*bf16"
    return "fp32" if name in ("eps", "q_eps", "k_eps", "k_inv", "v_inv") else "i32"


@pytest.mark.parametrize("unit_offset", [False, True], ids=["llama", "gemma"])
def test_norm_kernels_compile_for_hopper(unit_offset):
    """Without a GPU: rms_norm and qk_norm_rope (with its cache write) through Triton's compiler and ptxas for
    sm_90, with Llama's and Gemma's norm (the interpreter lets pass what the compiler may refuse); every
    constant given, no register spills."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pagedllm.layers.kernels.qk_norm_rope import qk_norm_rope_kernel
    from pagedllm.layers.kernels.rms_norm import rms_norm_kernel
    cases = [(rms_norm_kernel, dict(HAS_RESIDUAL=True, UNIT_OFFSET=unit_offset, BLOCK=2048), 8),
             (qk_norm_rope_kernel, dict(NUM_Q_HEADS=4, NUM_HEADS=5, HEAD_DIM=256, HALF_PAD=128, BLOCK_H=4,
                                        HAS_NORM=True, UNIT_OFFSET=unit_offset, WRITE_CACHE=True, BLOCK_SIZE=16), 4)]
    for fn, consts, warps in cases:
        for name in fn.arg_names:
            assert not name.isupper() or name in consts, f"{fn.__name__}: constant {name} not given"
        sig = {name: "constexpr" if name in consts else _arg_type(name) for name in fn.arg_names}
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        assert "ld.local" not in compiled.asm["ptx"], f"{fn.__name__}: registers spill"


def test_act_kernels_compile_for_hopper():
    """silu_and_mul's kernel and the fused fp8 one with each ACT through Triton's compiler and ptxas for sm_90
    (the interpreter takes a numpy tanh for libdevice's): no register spills, and gelu_tanh is another kernel."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pagedllm.layers.kernels.fused_quant_fp8 import silu_and_mul_quant_kernel
    from pagedllm.layers.kernels.silu_and_mul import silu_and_mul_kernel
    cases = [(silu_and_mul_kernel, dict(BLOCK=1024), 4),   # the fused one: the widest row fuse.py hands it
             (silu_and_mul_quant_kernel, dict(FP8_MAX=448.0, EPS=1e-12, BLOCK=32768), 16)]
    for fn, consts, warps in cases:
        ptx = {}
        for act in ("silu", "gelu_tanh"):
            given = dict(consts, ACT=act)
            for name in fn.arg_names:
                assert not name.isupper() or name in given, f"{fn.__name__}: constant {name} not given"
            sig = {name: "constexpr" if name in given else {"q_ptr": "*fp8e4nv", "scale_ptr": "*fp32"}.get(
                name, _arg_type(name)) for name in fn.arg_names}
            compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=given),
                                      target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
            ptx[act] = compiled.asm["ptx"]
            assert "ld.local" not in ptx[act], f"{fn.__name__} {act}: registers spill"
        assert ptx["silu"] != ptx["gelu_tanh"], f"{fn.__name__}: ACT changed nothing"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [1024, 4096, 896, 5120])
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
def test_rms_norm(dtype, hidden, num_tokens, with_residual, gemma):
    check_rms_norm(num_tokens, hidden, dtype, with_residual, "cuda", seed=hidden + num_tokens, gemma=gemma)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("inter", [3072, 14336, 4864, 1000])
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_silu_and_mul(dtype, inter, num_tokens):
    check_silu_and_mul(num_tokens, inter, dtype, "cuda", seed=inter + num_tokens)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("inter", [16384, 6912, 10240, 1000])   # Gemma 2B's, Gemma 3 1B's and 4B's
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_gelu_and_mul(dtype, inter, num_tokens):
    check_gelu_and_mul(num_tokens, inter, dtype, "cuda", seed=inter + num_tokens)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads,head_dim", [((16, 8), 128), ((32, 8), 128), ((14, 2), 64), ((12, 4), 80)], ids=str)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
@pytest.mark.parametrize("norm", ["qk_norm", "rope_only", "gemma_qk_norm"])
def test_qk_norm_rope(dtype, heads, head_dim, num_tokens, norm):
    check_qk_norm_rope(num_tokens, *heads, head_dim, dtype, norm != "rope_only", "cuda", seed=head_dim + num_tokens,
                       gemma=norm == "gemma_qk_norm")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,cache_dtype,scales", [
    (torch.float32, torch.float32, (1.0, 1.0)), (torch.bfloat16, torch.bfloat16, (1.0, 1.0)),
    (torch.float16, torch.float16, (1.0, 1.0)), (torch.bfloat16, torch.float8_e4m3fn, (1.0, 1.0)),
    (torch.bfloat16, torch.float8_e4m3fn, (0.43, 2.7)), (torch.float16, torch.float8_e4m3fn, (0.02, 0.05))], ids=str)
@pytest.mark.parametrize("heads,head_dim", [((16, 8), 128), ((14, 2), 64), ((12, 4), 80)], ids=str)
@pytest.mark.parametrize("num_tokens", [1, 7, 256, 3000])
@pytest.mark.parametrize("gemma", [False, True], ids=["llama_norm", "gemma_norm"])
def test_qk_norm_rope_writes_cache(dtype, cache_dtype, scales, heads, head_dim, num_tokens, gemma):
    """The K/V the fused kernel stores are the bytes reshape_and_cache stores (small scales: the fp8 clamp)."""
    check_qk_norm_rope_cache(num_tokens, *heads, head_dim, dtype, cache_dtype, "cuda", scales, block_size=16,
                             seed=head_dim + num_tokens, gemma=gemma)


@pytest.mark.gpu
@torch.no_grad()
def test_layers_dispatch_to_kernels_on_cuda():
    """The layers' forward on CUDA is the fused kernel; on CPU the torch code (checked by the e2e tests)."""
    x, res = torch.randn(2, 33, 1024, device="cuda", dtype=torch.bfloat16).unbind(0)
    norm = RMSNorm(1024).to("cuda", torch.bfloat16)
    assert torch.equal(norm(x), rms_norm(x, norm.weight, norm.variance_epsilon))
    for got, want in zip(norm(x, res), rms_norm(x, norm.weight, norm.variance_epsilon, res), strict=True):
        assert torch.equal(got, want)
    assert torch.equal(SiluAndMul()(x), silu_and_mul(x))
    assert torch.equal(GeluTanhAndMul()(x), silu_and_mul(x, "gelu_tanh"))
    assert not torch.equal(GeluTanhAndMul()(x), SiluAndMul()(x))


@pytest.mark.gpu
@torch.no_grad()
def test_gemma_norms_dispatch_to_kernels_on_cuda():
    """GemmaRMSNorm's forward on CUDA is rms_norm with unit_offset (the torch code: CPU only); Gemma 3's attention
    takes the fused q/k path with the flag set (LlamaAttention.unit_offset)."""
    from pagedllm.models.gemma import GemmaRMSNorm
    x, res = torch.randn(2, 33, 1152, device="cuda", dtype=torch.bfloat16).unbind(0)
    norm = GemmaRMSNorm(1152).to("cuda", torch.bfloat16)
    norm.weight.data.normal_(0, 0.3)
    assert torch.equal(norm(x), rms_norm(x, norm.weight, norm.variance_epsilon, unit_offset=True))
    for got, want in zip(norm(x, res), rms_norm(x, norm.weight, norm.variance_epsilon, res, unit_offset=True),
                         strict=True):
        assert torch.equal(got, want)
    assert not torch.equal(norm(x), rms_norm(x, norm.weight, norm.variance_epsilon))   # Llama's is another norm
    attn = make_attention(4, 1, 256, True, "cuda", gemma=True)   # Gemma 3 1B's heads: 4 q, 1 kv, D 256
    assert attn.unit_offset and not make_attention(4, 1, 256, True, "cuda").unit_offset
    for n in (attn.q_norm, attn.k_norm):
        n.weight.data = torch.randn(256, device="cuda", dtype=torch.bfloat16) * 0.3
    qkv, pos = torch.randn(9, 6 * 256, device="cuda", dtype=torch.bfloat16), torch.arange(9, device="cuda")
    norms = [(n.weight, n.variance_epsilon) for n in (attn.q_norm, attn.k_norm)]
    want = qk_norm_rope(qkv, pos, attn.rotary_emb.cos_sin_cache, 4, 1, 256, *norms, unit_offset=True)
    for got, w in zip(attn.rotate_qk(pos, qkv), want, strict=True):
        assert torch.equal(got, w)


@pytest.mark.gpu
@torch.no_grad()
def test_cuda_graph_replay_matches_eager():
    """Captured once at T=256, replayed on new data: bit-identical to eager calls (no host sync, no stale shapes)."""
    attn = make_attention(16, 8, 128, True, "cuda")
    weight = torch.randn(1024, device="cuda", dtype=torch.bfloat16)
    norms = [(n.weight.bfloat16(), n.variance_epsilon) for n in (attn.q_norm, attn.k_norm)]

    def step(x, res, qkv, pos):
        rotated = qk_norm_rope(qkv, pos, attn.rotary_emb.cos_sin_cache, 16, 8, 128, *norms)
        return (*rms_norm(x, weight, 1e-6, res), silu_and_mul(x), *rotated)

    def inputs(seed):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        return (torch.randn(256, 1024, device="cuda", generator=gen).bfloat16(),
                torch.randn(256, 1024, device="cuda", generator=gen).bfloat16(),
                torch.randn(256, 4096, device="cuda", generator=gen).bfloat16(),
                torch.randint(0, 4096, (256,), device="cuda", generator=gen))
    static = inputs(0)
    step(*static)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = step(*static)
    for seed in (1, 2):
        new = inputs(seed)
        for dst, src in zip(static, new, strict=True):
            dst.copy_(src)
        graph.replay()
        for got, want in zip(graph_out, step(*new), strict=True):
            assert torch.equal(got, want)
