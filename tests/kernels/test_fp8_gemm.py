"""The FP8 linear on CUDA (pagedllm/layers/quantization/fp8.py) against its emulated definition, on fresh random
inputs: the per-token quant kernel bit-exact with the torch reference; torch._scaled_mm (rowwise scales) and the
Triton fp8_gemm (small GEMMs) within the rounding of its output dtype; the same inside a CUDA graph.

Not run under the Triton interpreter: its float8 cast drops the carry when rounding crosses a power of two
(31.2 -> 16 instead of 32; Triton 3.9 on CPU), so it is no oracle for this kernel.
"""
import pytest
import torch
from kernel_checks import rel_error

from pagedllm.layers.quantization.fp8 import (_scaled_mm_linear, fp8_linear, fp8_linear_emulated,
                                              quantize_per_channel, quantize_per_token, scaled_mm_supported)

pytestmark = pytest.mark.gpu

# (K, N) of each linear: Llama-3.1-8B (W2's model) and Qwen3-0.6B
LLAMA_8B = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
QWEN3_06B = {"qkv": (1024, 4096), "o": (2048, 1024), "gate_up": (1024, 6144), "down": (3072, 1024)}
SHAPES = [pytest.param(*kn, id=f"llama8b-{name}") for name, kn in LLAMA_8B.items()] + \
         [pytest.param(*kn, id=f"qwen3-0.6b-{name}") for name, kn in QWEN3_06B.items()]
NUM_TOKENS = [1, 7, 300, 4096]
DTYPES = [torch.bfloat16, torch.float16]


def _randn(shape, dtype, seed, scale=1.0, device="cuda"):
    gen = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(shape, generator=gen, device=device) * scale).to(dtype)


def _inputs(m, k, dtype, seed):
    """Rows of a wider buffer (a row stride != K); an all-zero row and an outlier row."""
    buf = _randn((m, k + 32), dtype, seed, 2.0)
    x = buf[:, :k]
    if m > 2:
        x[1] = 0
        x[2, 3] = 3000.0
    return x


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("k", [64, 300, 1024, 4096, 14336])
@pytest.mark.parametrize("m", NUM_TOKENS)
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_quant_kernel_is_bit_exact(m, k, dtype, static):
    from pagedllm.layers.kernels.quant_fp8 import per_token_quant_fp8
    x = _inputs(m, k, dtype, seed=m + k)
    input_scale = torch.tensor([0.05], device="cuda") if static else None   # clamps the outliers
    q, scale = per_token_quant_fp8(x, input_scale)
    ref_q, ref_scale = quantize_per_token(x, input_scale)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (m, 1) and scale.dtype == torch.float32
    assert torch.equal(scale, ref_scale)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))


def _layer(k, n, dtype, seed, bias, static):
    weight, weight_scale = quantize_per_channel(_randn((n, k), torch.float32, seed, 0.02))
    b = _randn((n,), dtype, seed + 1) if bias else None
    input_scale = torch.tensor([0.02], device="cuda") if static else None
    return weight, weight_scale, b, input_scale


def _check(out, x, layer):
    """Within twice the rounding of the output dtype plus 2^-11 for the accumulation: fp8 products are exact, but
    Hopper's fp8 MMA keeps fewer accumulator bits than fp32 (the H200 run: fp16 outputs at 4.8-5.0e-4 against
    4.2e-4 for twice fp16's rounding alone, at K 1024-14336)."""
    ref = fp8_linear_emulated(x.float(), *layer)   # float32 output: no rounding
    assert out.dtype == x.dtype and torch.isfinite(out).all()
    limit = 2 * rel_error(ref.to(x.dtype), ref) + 2.0 ** -11
    err = rel_error(out, ref)
    assert err <= limit, f"relative error {err:.2e} > {limit:.2e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("m", NUM_TOKENS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_scaled_mm_matches_emulated(m, k, n, dtype, bias, static):
    torch.backends.cuda.matmul.allow_tf32 = False
    assert scaled_mm_supported(k, n, dtype)
    x = _inputs(m, k, dtype, seed=m + n)
    layer = _layer(k, n, dtype, seed=k + n, bias=bias, static=static)
    out = _scaled_mm_linear(x, *layer)
    _check(out, x, layer)
    assert torch.equal(fp8_linear(x[None], *layer)[0], out)   # the dispatcher takes the same path


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("m", [1, 300, 4096])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("path", ["rowwise", "triton"])
def test_both_gemm_paths_match_emulated(monkeypatch, m, k, n, dtype, bias, path):
    """Each path at every size, whatever fp8.py would pick: _scaled_mm with rowwise scales, or the Triton kernel
    (its K up to 14336 shows that its tiles' dots are added in float32, not left in the MMA's accumulator)."""
    from pagedllm.layers.quantization import fp8
    torch.backends.cuda.matmul.allow_tf32 = False
    x = _inputs(m, k, dtype, seed=m + n + 1)
    layer = _layer(k, n, dtype, seed=k + n + 1, bias=bias, static=False)
    monkeypatch.setattr(fp8, "triton_serves", lambda m, n, k: path == "triton")
    _check(_scaled_mm_linear(x, *layer), x, layer)


@pytest.mark.parametrize("m", [1, 64, 65, 128, 256, 300, 512])
@pytest.mark.parametrize("k,n", [pytest.param(*kn, id=name) for name, kn in QWEN3_06B.items()])
def test_triton_gemm_at_decode_row_counts(m, k, n):
    """The kernel at each row count fp8.py may give it, odd counts (masked rows) included, with a bias."""
    from pagedllm.layers.kernels.fp8_gemm import fp8_gemm
    x = _inputs(m, k, torch.bfloat16, seed=m * 7 + n)
    weight, weight_scale, bias, _ = _layer(k, n, torch.bfloat16, seed=m + k, bias=True, static=False)
    q, scale = quantize_per_token(x)
    out = fp8_gemm(q, scale, weight, weight_scale, bias, torch.bfloat16)
    _check(out, x, (weight, weight_scale, bias, None))


def test_unaligned_shapes_fall_back_to_emulated():
    """The demo model's MLP (intermediate 172): _scaled_mm refuses K or N not a multiple of 16."""
    assert not scaled_mm_supported(172, 64, torch.bfloat16) and not scaled_mm_supported(64, 344, torch.bfloat16)
    x = _inputs(5, 172, torch.bfloat16, seed=1)
    layer = _layer(172, 64, torch.bfloat16, seed=2, bias=True, static=False)
    assert torch.equal(fp8_linear(x, *layer), fp8_linear_emulated(x, *layer))


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("m", [1, 64, 512])
def test_scaled_mm_path_in_cuda_graph(m, static):
    k, n = QWEN3_06B["gate_up"]
    dtype = torch.bfloat16
    layer = _layer(k, n, dtype, seed=3, bias=True, static=static)
    x = torch.zeros((m, k), dtype=dtype, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fp8_linear(x, *layer)   # warm-up: Triton compile, cuBLAS workspace
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8_linear(x, *layer)
    for seed in (10, 11):
        x.copy_(_inputs(m, k, dtype, seed=seed))
        graph.replay()
        torch.cuda.synchronize()
        _check(out, x, layer)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1024, 4096, 5120])
@pytest.mark.parametrize("m", [1, 7, 300])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_fused_rms_norm_quant_equals_the_pair(m, n, dtype, residual):
    """The fused kernel writes the bytes of rms_norm followed by the quant kernel, and the same residual."""
    from pagedllm.layers.kernels.fused_quant_fp8 import rms_norm_quant_fp8
    from pagedllm.layers.kernels.quant_fp8 import per_token_quant_fp8
    from pagedllm.layers.kernels.rms_norm import rms_norm
    x = _inputs(m, n, dtype, seed=m + n)
    res = _randn((m, n), dtype, seed=m + n + 1) if residual else None
    weight = (1 + _randn((n,), torch.float32, seed=3, scale=0.1)).to(dtype)
    got = rms_norm_quant_fp8(x, weight, 1e-6, res)
    want = rms_norm(x, weight, 1e-6, res)
    if residual:
        (got, got_res), (want, want_res) = got, want
        assert torch.equal(got_res, want_res)
    q, scale = got
    ref_q, ref_scale = per_token_quant_fp8(want)
    assert torch.equal(scale, ref_scale) and torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [3072, 14336, 28672])
@pytest.mark.parametrize("m", [1, 7, 300])
def test_fused_silu_and_mul_quant_equals_the_pair(m, n, dtype, act):
    from pagedllm.layers.kernels.fused_quant_fp8 import silu_and_mul_quant_fp8
    from pagedllm.layers.kernels.quant_fp8 import per_token_quant_fp8
    from pagedllm.layers.kernels.silu_and_mul import silu_and_mul
    gate_up = _randn((m, 2 * n), dtype, seed=m + n)
    q, scale = silu_and_mul_quant_fp8(gate_up, act)
    ref_q, ref_scale = per_token_quant_fp8(silu_and_mul(gate_up, act))
    assert torch.equal(scale, ref_scale) and torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))


@pytest.mark.parametrize("arch,num_fused", [("llama", 6), ("gemma", 2)])
def test_fused_model_equals_unfused(monkeypatch, arch, num_fused):
    """A tiny fp8 Llama (Gemma) of _scaled_mm-able widths: fusion flags its norms and activations (its GeGLU
    only), same MLP output."""
    from transformers import GemmaConfig, LlamaConfig

    from pagedllm.distributed.parallel_state import TPGroup
    from pagedllm.layers.quantization.fp8_config import Fp8Config
    from pagedllm.layers.quantization.fuse import fuse_fp8_inputs
    from pagedllm.models.gemma import GemmaForCausalLM
    from pagedllm.models.llama import LlamaForCausalLM
    from pagedllm.models.loader import _build, _init_dummy
    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (GemmaConfig, GemmaForCausalLM)
    cfg = config_cls(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=64, vocab_size=512)
    model = _build(model_cls, cfg, Fp8Config(), torch.bfloat16, torch.device("cuda"), TPGroup())
    _init_dummy(model)
    layer = model.model.layers[0]
    x, res = _randn((33, 256), torch.bfloat16, 1), _randn((33, 256), torch.bfloat16, 2)
    want = layer.mlp(layer.post_attention_layernorm(x, res)[0])
    assert fuse_fp8_inputs(model) == num_fused
    got = layer.mlp(layer.post_attention_layernorm(x, res)[0])
    assert torch.equal(got, want)
