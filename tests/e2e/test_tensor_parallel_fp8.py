"""Tensor parallelism with FP8 weights on CPU (gloo, float32, the emulated fp8 path): --quantization fp8 of a
float checkpoint and pre-quantized checkpoints (per-channel, block and static per-tensor scales) under TP=2.

TP=2 fp8 is not TP=1 fp8: a row-parallel rank (o_proj, down_proj) quantizes its slice of each activation row
per token, and a weight quantized at load (float or block checkpoints) per output channel over the columns
it holds, as vLLM does. The reference is a single-process float32 model doing that arithmetic itself from the
whole checkpoint (not through the TP loader): column-parallel layers as TP=1's Fp8Linear, each row-parallel
layer as the sum over the two ranks' column halves of fake-quantized input @ dequantized weight. The engine's
greedy tokens must equal the reference's greedy chain and its prompt logprobs be within PROMPT_LOGPROB_TOL."""
import pytest
import torch
from fp8_checkpoints import write_quantized
from safetensors.torch import load_file
from test_fp8_weights import _logits
from torch import nn
from transformers import AutoConfig

from conftest import make_tiny_model
from pagedllm import LLM, SamplingParams
from pagedllm.distributed.parallel_state import TPGroup
from pagedllm.layers.quantization.fp8 import dequantize_blocks, quantize_per_channel, quantize_per_token
from pagedllm.layers.quantization.fp8_linear import Fp8Linear
from pagedllm.models.loader import load_model

pytestmark = pytest.mark.usefixtures("one_thread_per_rank")

CPU = torch.device("cpu")
PROMPTS = [[1] + [5 + (7 * i + j) % 400 for j in range(n)] for i, n in enumerate((3, 17, 40))]
ENGINE = dict(device="cpu", dtype="float32", log_stats_interval=0, max_num_batched_tokens=32, max_model_len=256)
MAX_TOKENS = 8
# Measured max |prompt logprob - reference|: 2e-6 (float32 summation order: chunked prefill, batched rows), once
# 1.0e-3 (an fp8 rounding of one activation that order flipped). TP=1 fp8 differs from this reference by 0.56-1.34
# (argmax kept at 72-100% of positions): the per-rank quantization is what the bound tells apart.
PROMPT_LOGPROB_TOL = 5e-3
ROW_PARALLEL = ("o_proj", "down_proj")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp_fp8_models")
    # llama: biases on every linear (a row-parallel fp8 layer adds its bias once, after the all-reduce)
    return {"llama_bias": make_tiny_model(root / "llama", "llama", seed=21, attention_bias=True, mlp_bias=True),
            "qwen3": make_tiny_model(root / "qwen3", "qwen3", seed=3)}   # head_dim 32: whole 32x32 blocks a rank


def expected_qkv(full: torch.Tensor, cfg, rank: int) -> torch.Tensor:
    """Rank `rank` of 2's rows of a fused qkv tensor: its q heads' rows, then its KV head's k and v rows (one KV
    head a rank)."""
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    parts = [(rank * q // 2, (rank + 1) * q // 2), (q + rank * kv // 2, q + (rank + 1) * kv // 2),
             (q + kv + rank * kv // 2, q + kv + (rank + 1) * kv // 2)]
    return torch.cat([full[a:b] for a, b in parts])


class _TwoRankRowParallel(nn.Module):
    """sum over ranks r of fake_quant(x[:, cols_r]) @ weights[r]^T, + bias: a row-parallel Fp8Linear's
    arithmetic at TP=2, in one process."""

    def __init__(self, weights, bias, input_scale):
        super().__init__()
        self.weights, self.bias, self.input_scale = weights, bias, input_scale

    def forward(self, x):
        k = self.weights[0].shape[1]
        out = 0
        for r, w in enumerate(self.weights):
            q, scale = quantize_per_token(x[:, r * k:(r + 1) * k], self.input_scale)
            out = out + (q.float() * scale) @ w.t()
        return out if self.bias is None else out + self.bias


def _fake_quant_input(input_scale):
    def hook(module, args):
        q, scale = quantize_per_token(args[0], input_scale)
        return (q.float() * scale,)
    return hook


@torch.no_grad()
def tp2_reference(src: str, ckpt: str, quantization: str | None, requantized: bool):
    """The float32 model of `src` computing TP=2 fp8 (module docstring). requantized: the row-parallel weights
    are quantized per channel at load from float values (the float checkpoint's, or a block checkpoint's
    dequantized), so each rank's half gets its own scales; else (per-channel / per-tensor checkpoints) they are
    the checkpoint's fp8 values and whole-row scales, cut."""
    cfg = AutoConfig.from_pretrained(ckpt)
    tp1 = load_model(ckpt, cfg, torch.float32, CPU, "auto", quantization)
    ref = load_model(src, AutoConfig.from_pretrained(src), torch.float32, CPU)
    stored = load_file(f"{ckpt}/model.safetensors")
    block = (getattr(cfg, "quantization_config", None) or {}).get("weight_block_size")
    for name, layer in tp1.named_modules():
        if not isinstance(layer, Fp8Linear):
            continue
        dequantized = layer.weight.float() * layer.weight_scale[:, None]
        linear = ref.get_submodule(name)
        if not name.endswith(ROW_PARALLEL):
            linear.weight.copy_(dequantized)
            linear.register_forward_pre_hook(_fake_quant_input(layer.input_scale))
            continue
        source = linear.weight.float() if block is None else dequantize_blocks(
            stored[f"{name}.weight"], stored[f"{name}.weight_scale_inv"], tuple(block))
        k = layer.in_features // 2
        halves = [(source if requantized else dequantized)[:, r * k:(r + 1) * k] for r in range(2)]
        if requantized:
            halves = [q.float() * s[:, None] for q, s in map(quantize_per_channel, halves)]
        parent, _, leaf = name.rpartition(".")
        bias = None if layer.bias is None else layer.bias.float()
        setattr(ref.get_submodule(parent), leaf, _TwoRankRowParallel(halves, bias, layer.input_scale))
    return ref


@pytest.mark.parametrize("kind", [None, "ct_channel_dynamic", "fp8_tensor_static", "fp8_block"])
def test_fp8_rank_parameters(model_dirs, tmp_path, kind):
    """FP8 layers at TP=2 against the TP=1 model of the same checkpoint: column-parallel layers (qkv, gate_up)
    are rows of TP=1's, weights and scales; a row-parallel layer (o, down) holds its input columns of the
    checkpoint's fp8 weight with every output channel's scale whole (per-channel, per-tensor checkpoints), or,
    quantized at load (float, block checkpoints), its columns quantized on their own: each rank's own scales."""
    src = model_dirs["qwen3"]
    d = src if kind is None else write_quantized(src, tmp_path / kind, kind)
    cfg, quant = AutoConfig.from_pretrained(d), "fp8" if kind is None else None
    full = load_model(d, cfg, torch.float32, torch.device("cpu"), "auto", quant)
    stored = load_file(f"{d}/model.safetensors")
    for r in (0, 1):
        m = load_model(d, cfg, torch.float32, torch.device("cpu"), "auto", quant, tp=TPGroup(r, 2))
        fa, ma = full.model.layers[1].self_attn, m.model.layers[1].self_attn
        for attr in ("weight", "weight_scale"):
            assert torch.equal(getattr(ma.qkv_proj, attr).float(),
                               expected_qkv(getattr(fa.qkv_proj, attr).float(), cfg, r))
        fo, mo = full.model.layers[1].mlp.down_proj, m.model.layers[1].mlp.down_proj
        assert mo.tp is not None and mo.in_features == fo.in_features // 2
        cols = slice(r * mo.in_features, (r + 1) * mo.in_features)
        if kind in (None, "fp8_block"):
            name = "model.layers.1.mlp.down_proj"
            source = (stored[f"{name}.weight"] if kind is None else
                      dequantize_blocks(stored[f"{name}.weight"], stored[f"{name}.weight_scale_inv"], (32, 32)))
            q, scale = quantize_per_channel(source[:, cols])
            assert not torch.equal(scale, fo.weight_scale)   # the rank's own amax, not the whole row's
        else:
            q, scale = fo.weight[:, cols], fo.weight_scale
        assert torch.equal(mo.weight.float(), q.float()) and torch.equal(mo.weight_scale, scale)
        if kind == "fp8_tensor_static":
            assert mo.input_scale == fo.input_scale and ma.qkv_proj.input_scale == fa.qkv_proj.input_scale


def _reference_greedy(ref, prompt: list[int]) -> list[int]:
    seq = list(prompt)
    for _ in range(MAX_TOKENS):
        seq.append(int(_logits(ref, torch.tensor(seq))[-1].argmax()))
    return seq[len(prompt):]


def _check_against_reference(ckpt: str, ref, quantization: str | None, **engine_kw) -> float:
    """TP=2 engine vs the reference: greedy tokens equal, prompt logprobs (token and top 3) within the bound;
    returns the largest prompt logprob error."""
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, prompt_logprobs=3)
    llm = LLM(ckpt, quantization=quantization, tensor_parallel_size=2, **ENGINE, **engine_kw)
    try:
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
    finally:
        llm.shutdown()
    worst = 0.0
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert list(out.outputs[0].token_ids) == _reference_greedy(ref, prompt)
        expected = torch.log_softmax(_logits(ref, torch.tensor(prompt)), dim=-1)
        for pos, entry in enumerate(out.prompt_logprobs[1:]):
            for token, logprob in entry.items():
                worst = max(worst, abs(logprob.logprob - expected[pos, token].item()))
    print(f"max |prompt logprob - reference| {worst:.2e}")
    assert worst <= PROMPT_LOGPROB_TOL
    return worst


def test_tp2_quantize_at_load_matches_per_rank_reference(model_dirs):
    """--quantization fp8 of a float checkpoint: each rank quantizes the slice it loaded. (Qwen3's layers are
    quantized at load in the block test too.)"""
    d = model_dirs["llama_bias"]
    _check_against_reference(d, tp2_reference(d, d, "fp8", requantized=True), "fp8")


@pytest.mark.parametrize("kind", ["ct_channel_dynamic", "fp8_block"])
def test_tp2_prequantized_checkpoint_matches_per_rank_reference(model_dirs, tmp_path, kind):
    """Per-channel scales: cut with a column-parallel layer's rows, whole for a row-parallel one; block scales:
    cut by block, and the rank's dequantized slice requantized per channel."""
    src = model_dirs["qwen3"]
    ckpt = write_quantized(src, tmp_path / kind, kind)
    _check_against_reference(ckpt, tp2_reference(src, ckpt, None, requantized=kind == "fp8_block"), None)


def test_tp2_static_per_tensor_checkpoint_with_fp8_kv_equals_tp1(model_dirs, tmp_path):
    """Static per-tensor scales (weights and inputs) and the checkpoint's KV scales (0-d tensors, read whole
    by every rank) with --kv-cache-dtype fp8: no per-rank quantization at all, so TP=2 gives TP=1's tokens and
    logprobs (float32 summation order aside)."""
    ckpt = write_quantized(model_dirs["qwen3"], tmp_path / "static", "fp8_tensor_static")
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3)
    runs = []
    for tp in (1, 2):
        llm = LLM(ckpt, tensor_parallel_size=tp, kv_cache_dtype="fp8", **ENGINE)
        try:
            runs.append(llm.generate(PROMPTS, params, use_tqdm=False))
            attn = llm.engine.runner.model.model.layers[1].self_attn.attn
            assert (attn.k_scale, attn.v_scale) == (0.75, 0.875)   # kv_scale(1, 0), kv_scale(1, 1)
        finally:
            llm.shutdown()
    for one, two in zip(*runs, strict=True):
        assert one.outputs[0].token_ids == two.outputs[0].token_ids
        for a, b in zip(one.outputs[0].logprobs, two.outputs[0].logprobs, strict=True):
            assert set(a) == set(b) and all(abs(a[t].logprob - b[t].logprob) <= 1e-4 for t in a)
