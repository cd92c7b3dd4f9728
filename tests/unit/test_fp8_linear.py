"""FP8 quantization math (pagedllm/layers/quantization/fp8.py) and the Fp8Linear layer's loading, on CPU."""
import pytest
import torch

from pagedllm.layers.quantization.fp8 import (FP8, FP8_MAX, INV_FP8_MAX, dequantize_blocks, fp8_linear,
                                              fp8_linear_emulated, quantize_per_channel, quantize_per_token)
from pagedllm.layers.quantization.fp8_config import FP8_BLOCK, FP8_SCALED, Fp8Config, fp8_config
from pagedllm.layers.quantization.fp8_linear import Fp8Linear
from pagedllm.layers.quantization.kv_scales import kv_scale_target

E4M3_REL = 2 ** -4   # e4m3 keeps 3 mantissa bits: round to nearest is off by at most half an ulp = 1/16 relative


def _randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def test_per_channel_round_trip_within_half_ulp():
    w = _randn(64, 96) * torch.logspace(-3, 2, 64)[:, None]    # rows of very different magnitudes
    q, scale = quantize_per_channel(w)
    assert q.dtype == FP8 and scale.shape == (64,) and scale.dtype == torch.float32
    assert torch.equal(scale, w.abs().amax(dim=1) * INV_FP8_MAX)
    back = q.float() * scale[:, None]
    # each row's absmax lands on 448 (up to float32 rounding of x / scale * scale); normal values within
    # 1/16 relative, subnormals within half the smallest subnormal step (2^-10 of the scale)
    assert torch.allclose(back.abs().amax(dim=1), w.abs().amax(dim=1), rtol=1e-6, atol=0)
    bound = torch.maximum(w.abs() * E4M3_REL, scale[:, None] * 2.0 ** -10)
    assert ((back - w).abs() <= bound * (1 + 1e-6)).all()


def test_per_token_round_trip_and_static_scale():
    x = _randn(5, 40, seed=1, scale=3.0)
    q, scale = quantize_per_token(x)
    assert scale.shape == (5, 1)
    assert torch.allclose(q.float() * scale, x, rtol=E4M3_REL, atol=float(scale.max()) * 2 ** -10)
    static = torch.tensor(0.05)
    q, scale = quantize_per_token(x, static)
    assert torch.equal(scale, torch.full((5, 1), 0.05))
    assert torch.equal(q, (x / 0.05).clamp(-FP8_MAX, FP8_MAX).to(FP8))


def test_clamping_gives_no_nan():
    x = torch.tensor([[1e6, -1e6, 3.0, 0.0]])
    q, _ = quantize_per_token(x, torch.tensor(1.0))   # a static scale far too small for the values
    assert torch.equal(q.float(), torch.tensor([[FP8_MAX, -FP8_MAX, 3.0, 0.0]]))
    q, scale = quantize_per_token(torch.zeros(2, 8))   # an all-zero row: the eps floor, zeros
    assert torch.isfinite(scale).all() and (scale > 0).all() and torch.equal(q.float(), torch.zeros(2, 8))
    q, scale = quantize_per_channel(torch.tensor([[3e38, -1.0], [0.0, 0.0]]))
    assert torch.isfinite(q.float()).all() and torch.isfinite(scale).all()


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_emulated_forward_is_its_definition(static, bias):
    x, w = _randn(7, 48, seed=2), _randn(32, 48, seed=3)
    q, s = quantize_per_channel(w)
    b = _randn(32, seed=4) if bias else None
    input_scale = torch.tensor(0.02) if static else None
    out = fp8_linear_emulated(x, q, s, b, input_scale)
    # the same definition in float64, elementwise: sum_k (qx * sx) * (qw * sw)
    qx, sx = quantize_per_token(x, input_scale)
    ref = ((qx.double() * sx.double())[:, None, :] * (q.double() * s.double()[:, None])[None]).sum(-1)
    if bias:
        ref = ref + b.double()
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(fp8_linear(x[None], q, s, b, input_scale)[0], out)   # (..., K) through the dispatcher


def test_fp8_error_against_float32_linear_is_bounded():
    """W8A8 against the unquantized float32 linear: each operand off by ~2.6% rms (uniform rounding of 3
    mantissa bits), so ~3.7% for the product; bound 5% (measured 3.6-3.8% on these shapes)."""
    for seed, (m, k, n) in enumerate([(16, 256, 128), (3, 1024, 64), (64, 96, 512)]):
        x, w = _randn(m, k, seed=seed), _randn(n, k, seed=seed + 10, scale=0.05)
        out = fp8_linear_emulated(x, *quantize_per_channel(w), None, None)
        ref = x @ w.t()
        assert ((out - ref).norm() / ref.norm()).item() < 0.05


def test_block_dequantization():
    w = _randn(300, 200, seed=5)
    scales = torch.rand(3, 2, generator=torch.Generator().manual_seed(6)) + 0.5
    q = (w / scales.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200]).to(FP8)
    deq = dequantize_blocks(q, scales, (128, 128))
    assert torch.equal(deq[:128, :128], q[:128, :128].float() * scales[0, 0])
    assert torch.equal(deq[256:, 128:], q[256:, 128:].float() * scales[2, 1])


def test_fused_layer_loads_shards_into_their_rows():
    """A per-tensor scale fills its shard's rows exactly; static input scales: the max of the shards'."""
    layer = Fp8Linear(16, (8, 4, 4), bias=True, config=Fp8Config(FP8_SCALED, static_input=True))
    for i, rows in enumerate((8, 4, 4)):
        layer.load_shard(f"s{i}.weight", "weight", torch.full((rows, 16), float(i + 1)).to(FP8), i)
        layer.load_shard(f"s{i}.weight_scale", "weight_scale", torch.tensor(0.5 * (i + 1)), i)
        layer.load_shard(f"s{i}.input_scale", "input_scale", torch.tensor([0.1, 0.3, 0.2][i]), i)
        layer.load_shard(f"s{i}.bias", "bias", torch.full((rows,), float(i)), i)
    assert torch.equal(layer.weight_scale, torch.tensor([0.5] * 8 + [1.0] * 4 + [1.5] * 4))
    assert torch.equal(layer.weight.float()[:, 0], torch.tensor([1.0] * 8 + [2.0] * 4 + [3.0] * 4))
    assert layer.input_scale.item() == pytest.approx(0.3)
    assert torch.equal(layer.bias, torch.tensor([0.0] * 8 + [1.0] * 4 + [2.0] * 4))
    with pytest.raises(ValueError, match="shape"):
        layer.load_shard("s0.weight", "weight", torch.zeros(4, 16).to(FP8), 0)


def test_float_weights_quantize_per_shard_as_a_whole():
    w = _randn(12, 16, seed=7)
    fused = Fp8Linear(16, (8, 4), bias=False, config=Fp8Config())
    fused.load_shard("a.weight", "weight", w[:8], 0)
    fused.load_shard("b.weight", "weight", w[8:], 1)
    q, s = quantize_per_channel(w)
    assert torch.equal(fused.weight.view(torch.uint8), q.view(torch.uint8)) and torch.equal(fused.weight_scale, s)


def test_block_weights_wait_for_their_scales():
    w = _randn(130, 64, seed=8)
    layer = Fp8Linear(64, (130,), bias=False, config=Fp8Config(FP8_BLOCK, block_size=(128, 128)))
    scales = torch.tensor([[0.01], [0.02]])
    q = (w / scales.repeat_interleave(128, 0)[:130]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    layer.load_shard("x.weight_scale_inv", "weight_scale_inv", scales, 0)
    assert torch.equal(layer.weight_scale, torch.ones(130))   # nothing yet: waits for the weight
    layer.load_shard("x.weight", "weight", q, 0)
    ref_q, ref_s = quantize_per_channel(dequantize_blocks(q, scales, (128, 128)))
    assert torch.equal(layer.weight.view(torch.uint8), ref_q.view(torch.uint8))
    assert torch.equal(layer.weight_scale, ref_s)


def test_kv_scale_names():
    assert kv_scale_target("model.layers.3.self_attn.k_scale") == ("model.layers.3.self_attn.attn", ("k_scale",))
    assert kv_scale_target("model.layers.0.self_attn.v_proj.output_scale") == ("model.layers.0.self_attn.attn",
                                                                               ("v_scale",))
    assert kv_scale_target("model.layers.1.self_attn.kv_scale")[1] == ("k_scale", "v_scale")
    assert kv_scale_target("model.layers.1.self_attn.q_proj.weight_scale") is None
    assert kv_scale_target("model.layers.1.self_attn.k_proj.input_scale") is None


class _Cfg:
    def __init__(self, qc):
        self.quantization_config = qc


def _ct(weights=None, acts=None, ignore=("lm_head",)):
    weights = weights or {"num_bits": 8, "type": "float", "strategy": "channel", "dynamic": False}
    acts = acts if acts is not None else {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}
    return {"quant_method": "compressed-tensors", "ignore": list(ignore),
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}}}


def test_config_kinds():
    assert fp8_config(None, _Cfg(None)) is None
    assert fp8_config("fp8", _Cfg(None)) == Fp8Config()
    assert fp8_config(None, _Cfg({"quant_method": "fp8", "activation_scheme": "static"})).static_input
    block = fp8_config(None, _Cfg({"quant_method": "fp8", "activation_scheme": "dynamic",
                                   "weight_block_size": [128, 128]}))
    assert block.weight_format == FP8_BLOCK and block.block_size == (128, 128)
    ct = fp8_config("fp8", _Cfg(_ct(ignore=("lm_head", "re:.*layers\\.1\\.mlp\\..*"))))
    assert not ct.static_input and ct.is_ignored("model.layers.1.mlp.down_proj")
    assert not ct.is_ignored("model.layers.0.mlp.down_proj")
    static = _ct(acts={"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False})
    assert fp8_config(None, _Cfg(static)).static_input


@pytest.mark.parametrize("qc,field", [
    ({"quant_method": "gptq", "bits": 4}, "quant_method"),
    ({"quant_method": "fp8", "activation_scheme": "weird"}, "activation_scheme"),
    ({"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]}, "weight_block_size"),
    (_ct(weights={"num_bits": 4, "type": "int", "strategy": "group"}), "config_groups.group_0.weights"),
    (_ct(acts={}), "config_groups.group_0.input_activations"),
    ({**_ct(), "config_groups": {"group_0": {**_ct()["config_groups"]["group_0"], "input_activations": None}}},
     "config_groups.group_0.input_activations"),
    (_ct(acts={"num_bits": 8, "type": "float", "strategy": "token", "dynamic": False}),
     "config_groups.group_0.input_activations.strategy"),
    (_ct(ignore=()), "ignore"),
])
def test_bad_configs_name_the_field(qc, field):
    with pytest.raises(ValueError, match=f"quantization_config.{field}"):
        fp8_config(None, _Cfg(qc))


def test_the_triton_gemm_serves_what_it_measured_faster_at():
    """fp8.triton_serves (m, n, k): Qwen3-0.6B's narrow layers (o, down) at decode sizes and any of its layers at
    64 rows; not its wide ones (qkv, gate_up) at more rows, not Llama-3.1-8B's, not past TRITON_MAX_M rows."""
    from pagedllm.layers.quantization.fp8 import triton_serves
    o, down, qkv, gate_up = (1024, 2048), (1024, 3072), (4096, 1024), (6144, 1024)
    assert all(triton_serves(m, *o) and triton_serves(m, *down) for m in (1, 64, 300, 512))
    assert triton_serves(64, *qkv) and triton_serves(64, *gate_up)
    assert not triton_serves(65, *qkv) and not triton_serves(300, *gate_up)
    assert not triton_serves(1, 4096, 4096) and not triton_serves(513, *o)
