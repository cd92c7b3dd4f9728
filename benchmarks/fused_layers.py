"""Fused layer kernels vs the torch code they replace, on one GPU, Qwen3-0.6B shapes in bfloat16.

    PYTHONPATH=$PWD python3 benchmarks/fused_layers.py

Per op (RMSNorm + residual add, q/k norm + rotary, SiLU-and-mul) at the W1 decode shape (T=256) and a
prefill chunk (T=8192); then one whole decoder layer (dummy weights, paged attention through the Triton
backend) at T=256 decode and T=8192 prefill. Times are medians of triton.testing.do_bench_cudagraph:
many calls captured in one CUDA graph, so launch overhead is gone, as in the runner's decode graphs.
"""
import contextlib
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from triton.testing import do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kernels"))
from attention_cases import make_batch, rel_error

from pagedllm.attention.metadata import set_forward_context
from pagedllm.layers.activation import SiluAndMul
from pagedllm.layers.attention import Attention
from pagedllm.layers.norm import RMSNorm
from pagedllm.layers.rotary import RotaryEmbedding, rope_parameters
from pagedllm.models.llama import LlamaAttention, LlamaDecoderLayer

QWEN3_0_6B = SimpleNamespace(hidden_size=1024, intermediate_size=3072, num_attention_heads=16, num_key_value_heads=8,
                             head_dim=128, rms_norm_eps=1e-6, max_position_embeddings=40960, rope_theta=1e6,
                             attention_bias=False, mlp_bias=False, hidden_act="silu", num_hidden_layers=28)
DTYPE = torch.bfloat16


@contextlib.contextmanager
def torch_layers():
    """Route the layers to their torch code (forward_native), as on CPU; restored on exit."""
    saved = RMSNorm.forward, SiluAndMul.forward, LlamaAttention.rotate_qk, Attention.takes_qkv
    RMSNorm.forward = RMSNorm.forward_native
    SiluAndMul.forward = lambda self, gate_up: self.forward_native(gate_up)   # GeluTanhAndMul's own too
    LlamaAttention.rotate_qk = lambda self, positions, qkv, kv_target=None: self.rotate_qk_native(positions, qkv)
    Attention.takes_qkv = lambda self: False   # small decode steps: not decode_qkv's fused norm and rotary either
    try:
        yield
    finally:
        RMSNorm.forward, SiluAndMul.forward, LlamaAttention.rotate_qk, Attention.takes_qkv = saved


@contextlib.contextmanager
def build_on_gpu():
    """Parameters created on the GPU in bfloat16 (as the loader does), the rotary table stays float32."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)
    try:
        with torch.device("cuda"):
            yield
    finally:
        torch.set_default_dtype(prev)


def bench_pair(name: str, fn) -> float:
    """fn() under torch_layers and as is: prints both times; returns the saving in microseconds."""
    with torch_layers():
        ref = fn()
        torch_us = do_bench_cudagraph(fn, return_mode="median") * 1e3
    out = fn()
    fused_us = do_bench_cudagraph(fn, return_mode="median") * 1e3
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    err = max(rel_error(o, r) for o, r in zip(outs, refs, strict=True))
    finite = all(torch.isfinite(o).all() for o in outs)
    print(f"  {name:<46} torch {torch_us:8.1f} us   fused {fused_us:8.1f} us   x{torch_us / fused_us:5.2f}   "
          f"rel diff {err:.1e}{'' if finite else '  NON-FINITE'}")
    return torch_us - fused_us


def bench_ops(num_tokens: int) -> None:
    cfg, gen = QWEN3_0_6B, torch.Generator(device="cuda").manual_seed(num_tokens)
    with build_on_gpu():
        norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, rope_parameters(cfg))
        attn = LlamaAttention(cfg, 0, rotary, qkv_bias=False, qk_norm=True)
    x, res = (torch.randn(num_tokens, cfg.hidden_size, device="cuda", generator=gen).to(DTYPE) for _ in range(2))
    qkv_width = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    qkv = torch.randn(num_tokens, qkv_width, device="cuda", generator=gen).to(DTYPE)
    positions = torch.randint(0, 4096, (num_tokens,), device="cuda", generator=gen)
    gate_up = torch.randn(num_tokens, 2 * cfg.intermediate_size, device="cuda", generator=gen).to(DTYPE)
    act = SiluAndMul()
    print(f"\nops, T={num_tokens}:")
    norm_saved = bench_pair("RMSNorm + residual (C=1024)", lambda: norm(x, res))
    rope_saved = bench_pair("q/k norm + rotary (16+8 heads x 128)", lambda: attn.rotate_qk(positions, qkv))
    silu_saved = bench_pair("SiLU-and-mul (I=3072)", lambda: act(gate_up))
    per_layer = 2 * norm_saved + rope_saved + silu_saved     # a layer runs two norms, one of each other op
    print(f"  sum over one layer's ops: {per_layer:.1f} us saved; x {cfg.num_hidden_layers} layers = "
          f"{per_layer * cfg.num_hidden_layers / 1e3:.2f} ms a step")


def bench_layer(name: str, rows: list[tuple[int, int]]) -> None:
    """One Qwen3-0.6B decoder layer forward (dummy weights) over a paged batch of (seq_len, query_len) rows."""
    cfg = QWEN3_0_6B
    with build_on_gpu():
        rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, rope_parameters(cfg))
        layer = LlamaDecoderLayer(cfg, 0, rotary, qkv_bias=False, qk_norm=True)
    batch = make_batch(rows, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, 16, DTYPE, "cuda")
    num_tokens = batch.q.shape[0]
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden, residual = (torch.randn(num_tokens, cfg.hidden_size, device="cuda", generator=gen).to(DTYPE)
                        for _ in range(2))
    positions = torch.tensor([p for s, q in rows for p in range(s - q, s)], device="cuda")
    with set_forward_context(batch.ref_meta, [batch.kv_cache]):
        saved = bench_pair(f"decoder layer, {name}", lambda: layer(positions, hidden, residual))
    print(f"  x {cfg.num_hidden_layers} layers = {saved * cfg.num_hidden_layers / 1e3:.2f} ms saved a forward")


@torch.inference_mode()
def main() -> None:
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, {DTYPE}")
    bench_ops(256)
    bench_ops(8192)
    rng = random.Random(0)
    print("\nlayers:")
    bench_layer("W1 decode 256 x U(100,2000)", [(rng.randint(100, 2000), 1) for _ in range(256)])
    bench_layer("prefill 8192 tok / 7 prompts", [(n, n) for n in (2048, 1536, 1024, 1024, 768, 1280, 512)])


if __name__ == "__main__":
    main()
