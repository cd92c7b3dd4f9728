"""FP8 GEMM (--quantization fp8) against bf16 torch.mm, per linear layer shape, on one GPU.

    PYTHONPATH=$PWD python3 benchmarks/fp8_gemm.py

Qwen3-0.6B's layers (W1's model) at M = 64-512 rows and Llama-3.1-8B's (W2's) at 256 and 512. Per
shape: TFLOP/s (2*M*N*K / time) of bf16 torch.mm (x @ W^T), of the whole fp8 path (per-token quant kernel +
torch._scaled_mm with rowwise scales, bf16 out) and of _scaled_mm alone (the quant kernel's share is the
difference), and of _scaled_mm with per-tensor scales (scalars: cuBLASLt's own fp8 kernels, what a per-tensor
activation scale would run). Times: medians of triton.testing.do_bench_cudagraph (launch overhead gone, as in
the runner's graphs). One line per shape.
"""
import torch
from triton.testing import do_bench_cudagraph

from pagedllm.layers.kernels.fp8_gemm import fp8_gemm
from pagedllm.layers.kernels.fp8_scale import fp8_scale
from pagedllm.layers.kernels.quant_fp8 import per_token_quant_fp8
from pagedllm.layers.quantization import fp8
from pagedllm.layers.quantization.fp8 import _scaled_mm_linear, quantize_per_channel

# name: (K, N)
LLAMA_8B = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
QWEN3_06B = {"qkv": (1024, 4096), "o": (2048, 1024), "gate_up": (1024, 6144), "down": (3072, 1024)}
CASES = [("qwen3-0.6b", QWEN3_06B, m) for m in (64, 128, 256, 512)] + [("llama8b", LLAMA_8B, m)
                                                                           for m in (256, 512)]


def unit_then_scale(q, scale, weight, weight_scale, one):
    """_scaled_mm with unit per-tensor scales (cuBLASLt's fast fp8 kernels), float32 out, then the rowwise
    scales in a kernel of their own: the fp8 path at up to UNIT_SCALE_MAX_M rows."""
    acc = torch._scaled_mm(q, weight.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    return fp8_scale(acc, scale, weight_scale, None, torch.bfloat16)


TRITON_TILES = [(64, 32, 128, 4, 4), (64, 64, 128, 4, 4), (64, 64, 256, 4, 3), (64, 128, 128, 4, 4),
                (64, 128, 128, 4, 3), (128, 64, 128, 4, 4), (128, 128, 128, 8, 3), (64, 256, 128, 8, 3)]


def tflops(m: int, k: int, n: int, ms: float) -> float:
    return 2 * m * n * k / (ms * 1e-3) / 1e12


def bench_shape(m: int, k: int, n: int) -> tuple[float, float, float, float, float]:
    """-> (bf16, fp8 path, _scaled_mm alone) TFLOP/s, the quant kernel's microseconds, per-tensor TFLOP/s."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    weight, weight_scale = quantize_per_channel(w)
    q, scale = per_token_quant_fp8(x)
    bf16 = do_bench_cudagraph(lambda: torch.mm(x, w.t()))
    fp8.UNIT_SCALE_MAX_M = 0   # the rowwise path, as before
    full = do_bench_cudagraph(lambda: _scaled_mm_linear(x, weight, weight_scale, None, None))
    fp8.UNIT_SCALE_MAX_M = 1 << 30
    full_unit = do_bench_cudagraph(lambda: _scaled_mm_linear(x, weight, weight_scale, None, None))
    mm = do_bench_cudagraph(lambda: torch._scaled_mm(q, weight.t(), scale_a=scale, scale_b=weight_scale.view(1, -1),
                                                     out_dtype=torch.bfloat16))
    quant = do_bench_cudagraph(lambda: per_token_quant_fp8(x))
    one = torch.ones((), device="cuda")
    tensor = do_bench_cudagraph(lambda: torch._scaled_mm(q, weight.t(), scale_a=one, scale_b=one,
                                                         out_dtype=torch.bfloat16))
    unit = do_bench_cudagraph(lambda: unit_then_scale(q, scale, weight, weight_scale, one))
    ref = torch._scaled_mm(q, weight.t(), scale_a=scale, scale_b=weight_scale.view(1, -1), out_dtype=torch.bfloat16)
    same = (unit_then_scale(q, scale, weight, weight_scale, one) == ref).float().mean().item()
    tiles = [(do_bench_cudagraph(lambda: fp8_gemm(q, scale, weight, weight_scale, None, torch.bfloat16, t)), t)
             for t in TRITON_TILES if t[0] <= max(64, 2 * m)]
    best, tile = min(tiles)
    tri = fp8_gemm(q, scale, weight, weight_scale, None, torch.bfloat16, tile)
    tri_same = (tri == ref).float().mean().item()
    return (tflops(m, k, n, bf16), tflops(m, k, n, full), tflops(m, k, n, mm), quant * 1e3, tflops(m, k, n, tensor),
            tflops(m, k, n, unit), same, tflops(m, k, n, full_unit), tflops(m, k, n, best), tile, tri_same)


def main() -> None:
    print(f"{torch.cuda.get_device_name()}  TFLOP/s: bf16 mm | fp8 quant+_scaled_mm | _scaled_mm alone "
          f"(speedup of the fp8 path) | quant kernel us | per-tensor _scaled_mm | unit scales, fp32 out + "
          f"scale kernel (share of outputs equal to rowwise) | the fp8 path with it | Triton fp8_gemm, best tile "
          f"(equal share; against rowwise _scaled_mm alone)")
    for model, shapes, m in CASES:
        for name, (k, n) in shapes.items():
            bf16, full, mm, quant_us, tensor, unit, same, full_unit, tri, tile, tri_same = bench_shape(m, k, n)
            print(f"{model:10s} {name:8s} M={m:<6d} K={k:<6d} N={n:<6d} {bf16:7.1f} | {full:7.1f} | {mm:7.1f} "
                  f"({full / bf16:4.2f}x) | {quant_us:6.1f} | {tensor:7.1f} | {unit:7.1f} ({same:.4f}) | "
                  f"{full_unit:7.1f} ({full_unit / bf16:4.2f}x) | {tri:7.1f} {tile} ({tri_same:.4f}; "
                  f"{tri / mm:4.2f}x rowwise)", flush=True)


if __name__ == "__main__":
    main()
