"""The plumbing of the fused FP8 inputs (layers/quantization/fuse.py) on CPU: with the fused CUDA kernels
replaced by torch stand-ins of their definition, a model whose norms and activations hand (fp8 rows, scales) to
the next FP8 linear gives exactly the unfused model's tokens and logprobs. The kernels themselves are checked
against the unfused pair on the GPU (tests/kernels/test_fp8_gemm.py)."""
import pytest
import torch
import torch.nn.functional as F

from pagedllm import LLM, SamplingParams
from pagedllm.config import DEMO_MODEL
from pagedllm.layers.quantization import fp8_linear
from pagedllm.layers.quantization.fp8 import quantize_per_token
from pagedllm.layers.quantization.fuse import fuse_fp8_inputs


def _rms_norm_quant(x, weight, eps, residual=None):
    s = x if residual is None else x + residual
    xf = s.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(s.dtype)
    out = quantize_per_token(weight * normed)
    return out if residual is None else (out, s)


def _silu_and_mul_quant(gate_up, act):
    gate, up = gate_up.chunk(2, dim=-1)
    return quantize_per_token((F.silu(gate) if act == "silu" else F.gelu(gate, approximate="tanh")) * up)


def _scaled_mm(q, scale, weight, weight_scale, bias, out_dtype):
    out = (q.float() * scale) @ (weight.float() * weight_scale.float()[:, None]).t()
    return (out if bias is None else out + bias.float()).to(out_dtype)


def _run(llm):
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=2, ignore_eos=True)
    outs = llm.generate([[5, 6, 7], [9] * 20, list(range(3, 40))], params, use_tqdm=False)
    return [(o.outputs[0].token_ids, [{t: lp.logprob for t, lp in d.items()} for d in o.outputs[0].logprobs])
            for o in outs]


@pytest.mark.parametrize("name", ["llama", "qwen3", "demo", "granite", "olmo2", "gemma", "gemma2", "gemma3"])
def test_fused_inputs_give_the_unfused_outputs(tiny_model_dirs, monkeypatch, name):
    monkeypatch.setattr("pagedllm.layers.norm.rms_norm_quant_fp8", _rms_norm_quant)
    monkeypatch.setattr("pagedllm.layers.activation.silu_and_mul_quant_fp8", _silu_and_mul_quant)
    monkeypatch.setattr(fp8_linear, "scaled_mm", _scaled_mm)
    model_dir = DEMO_MODEL if name == "demo" else tiny_model_dirs[name]
    llm = LLM(model_dir, device="cpu", dtype="bfloat16", quantization="fp8", log_stats_interval=0)
    unfused = _run(llm)
    model = llm.engine.runner.model
    assert fuse_fp8_inputs(model) == 0                       # a CPU model is never fused by the loader's call
    num_fused = fuse_fp8_inputs(model, on_cpu=True)
    if name.startswith("gemma"):   # GeGLU's only: their (1 + weight) norms have no fused kernel
        assert num_fused == len(model.model.layers)
    else:
        assert num_fused >= len(model.model.layers)           # at least one a layer (OLMo-2: SiLU-and-mul only)
    assert _run(llm) == unfused
