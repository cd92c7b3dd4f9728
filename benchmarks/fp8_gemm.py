"""FP8 GEMM (--quantization fp8) against bf16 torch.mm, per linear layer shape, on one GPU.

    PYTHONPATH=$PWD python3 benchmarks/fp8_gemm.py [--sweep]

Qwen3-0.6B's layers (W1's model) at M = 64-512 rows and Llama-3.1-8B's (W2's) at 256 and 512. Per shape:
TFLOP/s (2*M*N*K / time) of bf16 torch.mm (x @ W^T); of the whole fp8 path as the engine runs it (per-token quant
kernel + the GEMM fp8.py picks); of torch._scaled_mm with rowwise scales alone and of the Triton fp8_gemm alone
(its TILE; with --sweep, the best of TRITON_TILES too); of _scaled_mm with per-tensor scales (scalars:
cuBLASLt's own fp8 kernels, what a per-tensor activation scale would run). Times: medians of
triton.testing.do_bench_cudagraph (launch overhead gone, as in the runner's graphs). One line per shape.
"""
import sys

import torch
from triton.testing import do_bench_cudagraph

from pagedllm.layers.kernels.fp8_gemm import TILE, fp8_gemm
from pagedllm.layers.kernels.quant_fp8 import per_token_quant_fp8
from pagedllm.layers.quantization.fp8 import _scaled_mm_linear, quantize_per_channel

# name: (K, N)
LLAMA_8B = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
QWEN3_06B = {"qkv": (1024, 4096), "o": (2048, 1024), "gate_up": (1024, 6144), "down": (3072, 1024)}
CASES = [("qwen3-0.6b", QWEN3_06B, m) for m in (64, 128, 256, 512)] + [("llama8b", LLAMA_8B, m)
                                                                           for m in (256, 512)]
TRITON_TILES = [(64, 32, 128, 4, 4), (64, 64, 128, 4, 4), (64, 64, 256, 4, 3), (64, 128, 128, 4, 4),
                (64, 128, 128, 4, 3), (128, 64, 128, 4, 4), (128, 128, 128, 8, 3), (64, 256, 128, 8, 3)]


def tflops(m: int, k: int, n: int, ms: float) -> float:
    return 2 * m * n * k / (ms * 1e-3) / 1e12


def bench_shape(m: int, k: int, n: int, sweep: bool) -> dict:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    weight, weight_scale = quantize_per_channel(w)
    q, scale = per_token_quant_fp8(x)
    one = torch.ones((), device="cuda")
    times = {
        "bf16": do_bench_cudagraph(lambda: torch.mm(x, w.t())),
        "path": do_bench_cudagraph(lambda: _scaled_mm_linear(x, weight, weight_scale, None, None)),
        "rowwise": do_bench_cudagraph(lambda: torch._scaled_mm(q, weight.t(), scale_a=scale,
                                                               scale_b=weight_scale.view(1, -1),
                                                               out_dtype=torch.bfloat16)),
        "triton": do_bench_cudagraph(lambda: fp8_gemm(q, scale, weight, weight_scale, None, torch.bfloat16)),
        "tensor": do_bench_cudagraph(lambda: torch._scaled_mm(q, weight.t(), scale_a=one, scale_b=one,
                                                              out_dtype=torch.bfloat16)),
    }
    out = {name: tflops(m, k, n, ms) for name, ms in times.items()}
    if sweep:
        best = min((do_bench_cudagraph(lambda: fp8_gemm(q, scale, weight, weight_scale, None, torch.bfloat16, t)), t)
                   for t in TRITON_TILES if t[0] <= max(64, 2 * m))
        out["best"], out["best_tile"] = tflops(m, k, n, best[0]), best[1]
    return out


def main() -> None:
    sweep = "--sweep" in sys.argv
    print(f"{torch.cuda.get_device_name()}  TFLOP/s: bf16 mm | fp8 path (quant + GEMM) | rowwise _scaled_mm | "
          f"Triton fp8_gemm {TILE} | per-tensor _scaled_mm" + (" | best Triton tile" if sweep else ""))
    for model, shapes, m in CASES:
        for name, (k, n) in shapes.items():
            r = bench_shape(m, k, n, sweep)
            line = (f"{model:10s} {name:8s} M={m:<4d} K={k:<6d} N={n:<6d} {r['bf16']:7.1f} | {r['path']:7.1f} "
                    f"({r['path'] / r['bf16']:4.2f}x) | {r['rowwise']:7.1f} | {r['triton']:7.1f} "
                    f"| {r['tensor']:7.1f}")
            if sweep:
                line += f" | {r['best']:7.1f} {r['best_tile']}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
