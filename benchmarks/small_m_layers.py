"""A decoder layer's linear part at a few rows (W5: decode at batch 1, a verify of 5 rows), unfused against the
fused small-M kernels (layers/kernels/small_m_linear.py), on the W5 target (Qwen3-8B shape) and draft
(Qwen3-0.6B shape), bf16; attention and the q/k norm are left out (the same in both).

    unfused: rms_norm(+residual) -> cuBLAS qkv | cuBLAS o | rms_norm(+residual) -> cuBLAS gate_up -> silu_and_mul
             | cuBLAS down                                                          (7 launches)
    fused:   norm+qkv | o | norm+gate_up+silu | down                                (4 launches)

First each op alone, cuBLAS and the Triton kernel over a sweep of tiles (us a call, GB/s of weights), then the
layer both ways at the best tiles, each a CUDA graph of 28 layers replayed (launch gaps count as in the engine).

    python benchmarks/small_m_layers.py
"""
import itertools
import json
import sys

import torch
from triton.testing import do_bench

from pagedllm.layers.kernels.rms_norm import rms_norm
from pagedllm.layers.kernels.silu_and_mul import silu_and_mul
from pagedllm.layers.kernels.small_m_linear import small_m_linear

MODELS = {"Qwen3-8B": (4096, 6144, 4096, 12288), "Qwen3-0.6B": (1024, 4096, 2048, 3072)}  # hidden, qkv, q, inter
TILES = [(bn, bk, w, s) for bn, bk, w, s in itertools.product((16, 32, 64), (128, 256, 512), (4, 8), (3,))
         if bn * bk <= 16384]
LAYERS = 28


def us(fn, calls=LAYERS):
    """us a call of fn(layer), from a CUDA graph of fn(0) .. fn(calls - 1)."""
    fn(0)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i)
    return do_bench(g.replay, warmup=5, rep=60, return_mode="median") * 1e3 / calls


def main():
    torch.manual_seed(0)
    dt = torch.bfloat16
    only = sys.argv[1:]   # model names to run (default all)
    for model, (hidden, qkv_n, q_size, inter) in MODELS.items():
        if only and model not in only:
            continue
        # each layer its own weights, so that the small model's do not stay in L2 between layers
        w = {name: [torch.randn(n, k, device="cuda", dtype=dt) / k ** 0.5 for _ in range(LAYERS)]
             for name, (n, k) in {"qkv": (qkv_n, hidden), "o": (hidden, q_size), "gate_up": (2 * inter, hidden),
                                  "down": (hidden, inter)}.items()}
        norm_w = torch.rand(hidden, device="cuda", dtype=dt) + 0.5
        for m in (1, 5):
            x = torch.randn(m, hidden, device="cuda", dtype=dt)
            res = torch.randn(m, hidden, device="cuda", dtype=dt)
            attn = torch.randn(m, q_size, device="cuda", dtype=dt)
            act = torch.randn(m, inter, device="cuda", dtype=dt)
            ops = {   # name: (its weights, unfused fn(layer), fused fn(layer, tile))
                "norm+qkv": ("qkv", lambda i: torch.mm(rms_norm(x, norm_w, 1e-6, res)[0], w["qkv"][i].t()),
                             lambda i, t: small_m_linear(x, w["qkv"][i], norm_w, 1e-6, res, tile=t)[0]),
                "o": ("o", lambda i: torch.mm(attn, w["o"][i].t()),
                      lambda i, t: small_m_linear(attn, w["o"][i], tile=t)),
                "norm+gate_up+silu": ("gate_up", lambda i: silu_and_mul(torch.mm(rms_norm(x, norm_w, 1e-6, res)[0],
                                                                                 w["gate_up"][i].t())),
                                      lambda i, t: small_m_linear(x, w["gate_up"][i], norm_w, 1e-6, res, silu=True,
                                                                  tile=t)[0]),
                "down": ("down", lambda i: torch.mm(act, w["down"][i].t()),
                         lambda i, t: small_m_linear(act, w["down"][i], tile=t)),
            }
            best = {}
            for name, (wname, unfused, fused) in ops.items():
                ref = unfused(0).float()
                base = us(unfused)
                found = None
                for tile in TILES:
                    try:
                        err = (fused(0, tile).float() - ref).abs().max().item() / ref.abs().max().item()
                        if err > 2e-2:
                            print(f"  {name} tile {tile}: rel err {err:.2e}", flush=True)
                            continue
                        t = us(lambda i, tile=tile: fused(i, tile))
                    except Exception as e:
                        print(f"  {name} tile {tile}: {type(e).__name__} {str(e)[:120]}", flush=True)
                        continue
                    if found is None or t < found[0]:
                        found = (t, tile, err)
                best[name] = found[1]
                gb = w[wname][0].numel() * 2 / 1e3
                print(json.dumps({"model": model, "M": m, "op": name, "unfused_us": round(base, 2),
                                  "fused_us": round(found[0], 2), "tile": found[1], "weights_GBs_unfused":
                                  round(gb / base), "weights_GBs_fused": round(gb / found[0]),
                                  "rel_err": float(f"{found[2]:.2e}")}), flush=True)
            layer_unfused = us(lambda i: [f(i) for _, f, _ in ops.values()])
            layer_fused = us(lambda i: [g(i, best[n]) for n, (_, _, g) in ops.items()])
            print("TILES " + json.dumps({"model": model, "M": m, "tiles": best}), flush=True)
            print(json.dumps({"model": model, "M": m, "layer_unfused_us": round(layer_unfused, 2),
                              "layer_fused_us": round(layer_fused, 2),
                              "pass_saving_ms": round((layer_unfused - layer_fused) * LAYERS / 1e3, 3)}), flush=True)


if __name__ == "__main__":
    main()
