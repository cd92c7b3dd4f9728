"""The fused small-M linear kernel against the unfused torch code on CUDA (bf16, fp16, float32), and on CPU
through the Triton interpreter in a subprocess (float32); then a decoder layer with it against without it."""
import copy

import pytest
import torch
from kernel_checks import rel_error, run_under_interpreter
from small_m_cases import MODES, check, interpreter_cases, torch_path

from pagedllm.models.small_m import SMALL_M_OPS, TARGET_SMALL_M_OPS, forward_small_m, use_small_m

gpu = pytest.mark.gpu


def test_kernel_under_triton_interpreter():
    stdout = run_under_interpreter("small_m_cases.py", timeout=300)
    assert stdout.count("ok ") == len(list(interpreter_cases())), stdout


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("m,k,n", [(1, 1024, 4096), (5, 4096, 6144), (16, 3072, 1024), (3, 1000, 777)])
@pytest.mark.parametrize("tile", [(32, 256, 4, 3), (16, 512, 4, 3), (64, 128, 8, 4)], ids=str)   # 2: _small_m_tile
def test_kernel_matches_torch(dtype, mode, m, k, n, tile):
    check(mode, m, k, n, dtype, "cuda", seed=m + k + n, tile=tile)


def _tiny_qwen3():
    from transformers import Qwen3Config

    from pagedllm.models.qwen3 import Qwen3ForCausalLM
    cfg = Qwen3Config(vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    return model


def test_use_small_m_only_on_plain_half_layers():
    """The path is turned on for bf16 / fp16 layers of plain linears only: float32 models (the exact ones) and
    wrapped linears (LoRA, FP8, tensor parallelism) keep the unfused code."""
    model = _tiny_qwen3()
    use_small_m(model, ("o", "down"))
    assert all(not layer.small_m for layer in model.model.layers)   # float32
    model = model.to(torch.bfloat16)
    use_small_m(model, SMALL_M_OPS)
    assert all(layer.small_m == set(SMALL_M_OPS) for layer in model.model.layers)
    model = _tiny_qwen3().to(torch.float16)
    model.model.layers[1].mlp.down_proj = torch.nn.Sequential(model.model.layers[1].mlp.down_proj)   # a wrapper
    use_small_m(model, ("o", "down"))
    assert [bool(layer.small_m) for layer in model.model.layers] == [True, False]
    with pytest.raises(AssertionError):
        use_small_m(model, ("lm_head",))


def test_use_small_m_leaves_gemma_off():
    """Gemma's layer is Llama's with (1 + weight) norms and GeGLU, which small_m_linear's folded RMSNorm and SiLU
    do not compute: plain layers otherwise (bf16, plain linears), its path stays off."""
    from transformers import GemmaConfig

    from pagedllm.models.gemma import GemmaForCausalLM
    cfg = GemmaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
    model = GemmaForCausalLM(cfg).to(torch.bfloat16)
    use_small_m(model, SMALL_M_OPS)
    assert all(not layer.small_m for layer in model.model.layers)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("ops", [SMALL_M_OPS, TARGET_SMALL_M_OPS], ids=str)
def test_decoder_layers_with_and_without(dtype, ops):
    """Two Qwen3 layers of random weights, 1 to 16 rows: the small-M path (the draft's ops, the target's) against
    the unfused kernels, within the error the dtype's own rounding makes (both against float32)."""
    layers = _tiny_qwen3().model.layers

    def run(m, dt, small):
        layer = copy.deepcopy(layers[0]).to(device="cuda", dtype=dt)
        layer.small_m = frozenset(ops if small else ())
        layer.self_attn.attn = _NoAttention()
        x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m)).to("cuda", dt)
        res = torch.randn(m, 256, generator=torch.Generator().manual_seed(m + 1)).to("cuda", dt)
        pos = torch.arange(m, device="cuda")
        out, new_res = layer(pos, x, res)
        first, first_res = layer(pos, x, None)
        return [t.float().cpu() for t in (out, new_res, first, first_res)]
    for m in (1, 5, 16):
        ref = run(m, torch.float32, False)
        fused, unfused = run(m, dtype, True), run(m, dtype, False)
        for f, u, r in zip(fused, unfused, ref):
            assert rel_error(f, r) <= 1.5 * rel_error(u, r) + 1e-5


@pytest.mark.parametrize("residual_multiplier", [1.0, 0.3], ids=["llama", "granite"])
@pytest.mark.parametrize("ops", [SMALL_M_OPS, TARGET_SMALL_M_OPS, ("qkv",), ("gate_up", "down")], ids=str)
def test_decoder_layer_small_m_path_on_cpu(monkeypatch, ops, residual_multiplier):
    """small_m.forward_small_m's plumbing (which ops fold which norm, the residual stream, the first
    layer without a residual, Granite's residual_multiplier) on CPU: the kernel replaced by the torch code it
    fuses, float32, equal to forward."""
    from pagedllm.layers.norm import RMSNorm
    from pagedllm.models import small_m

    def torch_small_m(x, weight, norm_weight=None, eps=0.0, residual=None, silu=False, tile=None):
        norm = None
        if norm_weight is not None:
            norm = RMSNorm(x.shape[1], eps=eps)
            norm.weight.data = norm_weight
        out, new_res = torch_path(x, weight, norm, residual, silu)
        return out if residual is None else (out, new_res)
    monkeypatch.setattr(small_m, "small_m_linear", torch_small_m)
    layer = _tiny_qwen3().model.layers[0]
    layer.self_attn.attn = _NoAttention()
    layer.small_m = frozenset(ops)
    layer.residual_multiplier = residual_multiplier
    for m in (1, 5):
        g = torch.Generator().manual_seed(m)
        x, res, pos = torch.randn(m, 256, generator=g), torch.randn(m, 256, generator=g), torch.arange(m)
        for r in (res, None):
            got, want = forward_small_m(layer, pos, x, r), layer(pos, x, r)   # forward: CPU, the unfused code
            for a, b in zip(got, want):
                assert torch.allclose(a, b, rtol=1e-6, atol=1e-6), (ops, m, r is None, (a - b).abs().max())


class _NoAttention(torch.nn.Module):
    """q passed through as the attention output (the layers' linear arithmetic is what is compared)."""

    def kv_target(self):
        return {}

    def takes_qkv(self):   # the attention layer's decode_qkv question (LlamaAttention.attend asks it on CUDA)
        return False

    def forward(self, q, k, v):
        return q
