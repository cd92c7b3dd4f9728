"""The small-M decode path of Llama's decoder layer: steps of at most SMALL_M_ROWS tokens on CUDA run some of a
layer's linears through the fused small-M kernels (layers/kernels/small_m_linear.py), the norm before qkv and
gate_up and the SiLU-and-mul after gate_up folded in: at batch 1 they are launch- and latency-bound.
use_small_m turns it on (LlamaDecoderLayer.small_m); LlamaDecoderLayer.forward takes it through forward_small_m.
"""
import torch
from torch import nn

from pagedllm.layers.activation import SiluAndMul
from pagedllm.layers.norm import RMSNorm, add_norm
from pagedllm.lazy_kernel import lazy_kernel

small_m_linear = lazy_kernel(globals(), "pagedllm.layers.kernels.small_m_linear", "small_m_linear")
SMALL_M_ROWS = 16

# A draft model's: all four (Qwen3-0.6B shape, 1 row, H100: a layer 31.0 -> 27.2 us, though norm+qkv alone
# was 7.55 us against the norm kernel + cuBLAS's 7.13)
SMALL_M_OPS = ("qkv", "o", "gate_up", "down")
# A target's: on the Qwen3-8B shape at 1 and 5 rows (H100) the kernel beat cuBLAS on o and down, not on the others
TARGET_SMALL_M_OPS = ("o", "down")


def use_small_m(model: nn.Module, ops: tuple[str, ...]):
    """Turns the fused small-M path on for `ops` in each of the model's decoder layers whose linears are plain
    (plain(); call it after anything that wraps them, LoRA)."""
    from pagedllm.models.llama import LlamaDecoderLayer   # here: llama.py imports this module for its forward
    assert set(ops) <= set(SMALL_M_OPS), ops
    for layer in getattr(getattr(model, "model", None), "layers", []):
        if isinstance(layer, LlamaDecoderLayer) and plain(layer):
            layer.small_m = frozenset(ops)


def plain(layer: nn.Module) -> bool:
    """Plain bf16/fp16 nn.Linear weights without bias (not FP8, LoRA-wrapped or tensor-parallel), plain norms,
    a dense MLP. Plain norms and activation are Llama's RMSNorm and SiLU-and-mul, the ones small_m_linear folds
    (not Gemma's (1 + weight) norms and GeGLU)."""
    from pagedllm.models.llama import LlamaMLP   # (as in use_small_m)
    if not isinstance(layer.mlp, LlamaMLP) or type(layer.mlp.act_fn) is not SiluAndMul:
        return False
    attn, mlp, norms = layer.self_attn, layer.mlp, (layer.input_layernorm, layer.post_attention_layernorm)
    linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
    return (all(type(m) is nn.Linear and m.bias is None and m.weight.dtype in (torch.bfloat16, torch.float16)
                for m in linears)
            and all(type(n) is RMSNorm and not n.quant_fp8 and n.weight.dtype == mlp.down_proj.weight.dtype
                    for n in norms))


def forward_small_m(layer: nn.Module, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None):
    """LlamaDecoderLayer.forward's arithmetic with the ops in layer.small_m through small_m_linear: "qkv" and
    "gate_up" with the norm before them (and SiLU-and-mul after gate_up) folded in, "o" and "down" alone."""
    ops, attn, mlp = layer.small_m, layer.self_attn, layer.mlp
    if "qkv" in ops:
        qkv, residual = _norm_linear(layer.input_layernorm, attn.qkv_proj.weight, hidden, residual, False)
    else:
        hidden, residual = add_norm(layer.input_layernorm, hidden, residual)
        qkv = attn.qkv_proj(hidden)
    hidden = attn.attend(positions, qkv)
    hidden = layer.scaled(_small_m_only(attn.o_proj.weight, hidden) if "o" in ops else attn.o_proj(hidden))
    if "gate_up" in ops:
        act, residual = _norm_linear(layer.post_attention_layernorm, mlp.gate_up_proj.weight, hidden, residual,
                                     True)
    else:
        hidden, residual = layer.post_attention_layernorm(hidden, residual)
        act = mlp.act_fn(mlp.gate_up_proj(hidden))
    out = _small_m_only(mlp.down_proj.weight, act) if "down" in ops else mlp.down_proj(act)
    return layer.scaled(out), residual


def _norm_linear(norm: RMSNorm, weight: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                 silu: bool):
    """add_norm then the linear layer (and SiLU-and-mul: weight is [gate; up]) in one small_m_linear launch."""
    tile = _small_m_tile(weight.shape[0] // 2 if silu else weight.shape[0], True)
    out = small_m_linear(hidden, weight, norm.weight, norm.variance_epsilon, residual, silu=silu, tile=tile)
    return (out, hidden) if residual is None else out    # with a residual: (out, hidden + residual)


def _small_m_only(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The linear layer alone through small_m_linear."""
    return small_m_linear(x, weight, tile=_small_m_tile(weight.shape[0], False))


def _small_m_tile(n: int, norm: bool) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, warps, stages) for small_m_linear to n output features, a norm folded in or not: the
    best tiles of sweeps on the Qwen3-0.6B and -8B shapes at 1 row on an H100 (benchmarks/small_m_layers.py,
    session 40): narrow column tiles where N is small, so that there are still ~64 programs to read the weight."""
    return (16 if n <= 2048 else 32, 256 if norm else 512, 4, 3)
