"""Device time of the LoRA kernels (shrink + expand, pagedllm/lora/kernels.py) on Qwen3-0.6B's four LoRA layers,
beside the base layer's GEMM, at decode and prefill sizes: 8 rank-16 adapters, every token under one (decode: one
token a request, round-robin; prefill: requests of 512 tokens), or every token base (the early exits). Timed as
CUDA graphs of 20 calls (no launch overhead), bf16. One JSON line per (layer, T, case).

    python benchmarks/lora_kernels.py
"""
import json

import torch

from pagedllm.lora.kernels import add_lora

LAYERS = {"qkv_proj": (1024, (2048, 1024, 1024)), "o_proj": (2048, (1024,)), "gate_up_proj": (1024, (3072, 3072)),
          "down_proj": (3072, (1024,))}
RANK, LORAS, CALLS = 16, 8, 20


def graph_us(fn) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (5 * CALLS)


def slot_buffers(T: int, decode: bool, base: bool):
    if base:
        slots = torch.full((T,), -1)
    else:
        slots = torch.arange(T) % LORAS if decode else (torch.arange(T) // 512) % LORAS
    order = torch.sort(torch.where(slots < 0, LORAS, slots), stable=True).indices
    return order.to("cuda", torch.int32), slots[order].to("cuda", torch.int32)


def main():
    dt = torch.bfloat16
    for name, (fan_in, shards) in LAYERS.items():
        out, n = sum(shards), len(shards)
        weight = torch.randn(out, fan_in, device="cuda", dtype=dt) / fan_in ** 0.5
        a = torch.randn(LORAS, n * RANK, fan_in, device="cuda", dtype=dt) / fan_in ** 0.5
        b = torch.randn(LORAS, out, n * RANK, device="cuda", dtype=dt) * 0.01
        bounds = torch.tensor([sum(shards[:i]) for i in range(n + 1)], dtype=torch.int32, device="cuda")
        for T, decode in ((256, True), (2048, False), (8192, False)):
            x = torch.randn(T, fan_in, device="cuda", dtype=dt)
            y = torch.empty(T, out, device="cuda", dtype=dt)
            gemm_us = graph_us(lambda: torch.matmul(x, weight.t(), out=y))
            line = {"layer": name, "T": T, "base_gemm_us": round(gemm_us, 2)}
            for case in ("lora", "all_base"):
                order, slots = slot_buffers(T, decode, case == "all_base")
                us = graph_us(lambda: add_lora(y, x, a, b, order, slots, bounds, max(shards), RANK))
                line[f"{case}_us"] = round(us, 2)
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
