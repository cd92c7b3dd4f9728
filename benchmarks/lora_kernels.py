"""Device time of the LoRA kernels on Qwen3-0.6B's four LoRA layers, beside the base layer's GEMM: the split path
(shrink + expand, pagedllm/lora/kernels.py) against the fused kernel (pagedllm/lora/fused.py) at its default tiles
and, at T = 16 and 256, at a few other tiles. 8 rank-16 adapters; decode steps (a token a request, round-robin over
the adapters) of T = 1, 2, 4, 8, 16, 232, 256; prefill steps (requests of 512 tokens) of 2048 and 8192; and
T = 256 with every token base (the early exits). Timed as CUDA graphs of 28 calls (no launch overhead), bf16.
T = 232 is a W1 decode step (29 tokens an adapter): with --packed the adapters' runs lie end to end, as before
2026-12-04 (most tiles then hold two adapters); by default each starts a tile (lora/layers.py, sort_by_slot).

One JSON line per (layer, T); then a line per T with a step's total (x 28 layers) for split, fused and the best
tiles per layer; last the pick: split, the fused default, or the fused kernel at the tiles with the least
T = 232 + T = 16 time over the four layers, and `env`, the setting that selects it (PAGEDLLM_LORA_KERNEL=split,
or =fused with PAGEDLLM_LORA_FUSED_CONFIG=block_m,block_n,block_k,num_warps,num_stages).

By default the graph's 28 calls reuse one layer's weights and adapters, which then stay in L2 (8 adapters of a
layer: ~1-4 MB). A step's 28 layers hold ~280 MB of adapters: --layers-apart gives each of 28 calls its own copy,
and also times each layer's base GEMM followed by its LoRA, as a step runs them (fused_after_gemm: that minus the
GEMMs alone).
On W1 (H200, 2026-12-04) 8 adapters cost +1.51 ms of device time a decode step, twice the 0.80 ms this script gave
at T = 256 without it.

    python benchmarks/lora_kernels.py            (PAGEDLLM_LORA_FUSED_CONFIG=... sets the fused default)
    python benchmarks/lora_kernels.py --wide-gemm   (is A appended to the base weight worth building? see there)
"""
import argparse
import json

import numpy as np
import torch

from pagedllm.lora.fused import FusedConfig, layer_config, lora_fused
from pagedllm.lora.kernels import add_lora as add_lora_split
from pagedllm.lora.kernels import lora_expand
from pagedllm.lora.layers import sort_by_slot, sorted_len

LAYERS = {"qkv_proj": (1024, (2048, 1024, 1024)), "o_proj": (2048, (1024,)), "gate_up_proj": (1024, (3072, 3072)),
          "down_proj": (3072, (1024,))}
RANK, LORAS, NUM_LAYERS = 16, 8, 28   # a graph holds a step's NUM_LAYERS calls
APART, PACKED = False, False   # --layers-apart, --packed
DECODE, PREFILL, SWEEP_T = (1, 2, 4, 8, 16, 232, 256), (2048, 8192), (16, 232)
SWEEP = [FusedConfig(*c) for c in ((16, 64, 128, 4, 3), (16, 128, 128, 4, 4), (16, 256, 128, 4, 4),
                                   (16, 128, 256, 4, 4), (16, 256, 256, 8, 3), (16, 256, 128, 8, 4),
                                   # long K steps: a decode program's chain of dependent K steps is its latency
                                   (16, 256, 512, 8, 2), (16, 128, 512, 4, 2), (16, 256, 1024, 8, 1),
                                   (32, 256, 512, 8, 2), (32, 256, 128, 4, 4), (32, 128, 128, 4, 4))]
# the fused kernel's `programs` (above it a program takes several column tiles, computing x A once for them),
# 1024 was the default before 2026-12-04
PROGRAMS = (None, 264, 128, 64)   # None: lora_fused's default for the layer (264, or 64 where K >= 2048)


def graph_us(fn) -> float:
    for i in range(NUM_LAYERS):   # compiles, and touches every copy once
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(NUM_LAYERS):
            fn(i)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) * 1e3 / (5 * NUM_LAYERS), 2)


def slot_buffers(T: int, decode: bool, base: bool):
    if base:
        slots = torch.full((T,), -1)
    else:
        slots = torch.arange(T) % LORAS if decode else (torch.arange(T) // 512) % LORAS
    if PACKED:
        order = torch.sort(torch.where(slots < 0, LORAS, slots), stable=True).indices
        return order.to("cuda", torch.int32), slots[order].to("cuda", torch.int32)
    order, sorted_slots = np.empty(sorted_len(T, LORAS), np.int32), np.empty(sorted_len(T, LORAS), np.int32)
    sort_by_slot(slots.numpy(), LORAS, order, sorted_slots)
    return torch.from_numpy(order).cuda(), torch.from_numpy(sorted_slots).cuda()


def key(cfg: FusedConfig) -> str:
    return ",".join(str(v) for v in (cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages))


def bench_layer(name: str, fan_in: int, shards: tuple[int, ...], totals: dict, sweep: dict, programs: dict):
    dt = torch.bfloat16
    out, n, max_shard = sum(shards), len(shards), max(shards)
    copies = NUM_LAYERS if APART else 1   # --layers-apart: a step's 28 layers, each its own weights
    weight = torch.randn(copies, out, fan_in, device="cuda", dtype=dt) / fan_in ** 0.5
    a = torch.randn(copies, LORAS, n * RANK, fan_in, device="cuda", dtype=dt) / fan_in ** 0.5
    b = torch.randn(copies, LORAS, out, n * RANK, device="cuda", dtype=dt) * 0.01
    bounds = torch.tensor([sum(shards[:i]) for i in range(n + 1)], dtype=torch.int32, device="cuda")
    default = layer_config(fan_in, max_shard, RANK)
    cases = [(T, True, False) for T in DECODE] + [(T, False, False) for T in PREFILL] + [(256, True, True)]
    for T, decode, all_base in cases:
        x = torch.randn(T, fan_in, device="cuda", dtype=dt)
        y = torch.zeros(T, out, device="cuda", dtype=dt)
        order, slots = slot_buffers(T, decode, all_base)
        def args(i):   # call i's operands: layer i's copy
            return y, x, a[i % copies], b[i % copies], order, slots, bounds, max_shard, RANK
        line = {"layer": name, "T": T, "case": "all_base" if all_base else "decode" if decode else "prefill",
                "base_gemm_us": graph_us(lambda i: torch.matmul(x, weight[i % copies].t(), out=y)),
                "split_us": graph_us(lambda i: add_lora_split(*args(i))),
                "fused_us": graph_us(lambda i: lora_fused(*args(i), config=default)), "fused_tiles": key(default)}
        if APART:   # as in a step: each layer's base GEMM (its weights through L2), then its LoRA; minus the GEMMs
            both = graph_us(lambda i: (torch.matmul(x, weight[i % copies].t(), out=y),
                                       lora_fused(*args(i), config=default)))
            line["fused_after_gemm_us"] = round(both - line["base_gemm_us"], 2)
        if T in SWEEP_T and not all_base:
            tiles = {key(c): graph_us(lambda i, c=c: lora_fused(*args(i), config=c)) for c in SWEEP}
            line["best_tiles"] = min(tiles, key=tiles.get)
            line["tiles_us"] = tiles
            for k, us in tiles.items():
                sweep[(k, T)] = sweep.get((k, T), 0.0) + us
        if not all_base:
            line["programs_us"] = {p or "default": graph_us(lambda i, p=p: lora_fused(*args(i), config=default,
                                                                                      programs=p))
                                   for p in PROGRAMS}
            for p, us in line["programs_us"].items():
                programs[(p, T)] = programs.get((p, T), 0.0) + us
        t = totals.setdefault((T, line["case"]), {})
        for path in ("split", "fused", "fused_after_gemm"):   # the last with --layers-apart only
            if f"{path}_us" in line:
                t[path] = t.get(path, 0.0) + line[f"{path}_us"]
        t["best"] = t.get("best", 0.0) + min([line["fused_us"], *line.get("tiles_us", {}).values()])
        print(json.dumps(line), flush=True)


def bench_wide_gemm(name: str, fan_in: int, shards: tuple[int, ...], totals: dict):
    """--wide-gemm: what a step's LoRA would cost if each slot's A rows were appended to the base weight, so that
    the base GEMM computes t = x A^T in its extra columns and only the expand kernel is left (reading each row's
    slot's columns: slot_stride; tests/kernels/lora_cases.py's wide_gemm checks the result), against the fused
    kernel after the plain GEMM. Each call on its own layer's weights (as --layers-apart), decode steps."""
    dt = torch.bfloat16
    out, n, max_shard = sum(shards), len(shards), max(shards)
    extra = LORAS * n * RANK
    weight = torch.randn(NUM_LAYERS, out + extra, fan_in, device="cuda", dtype=dt) / fan_in ** 0.5
    a = weight[:, out:].reshape(NUM_LAYERS, LORAS, n * RANK, fan_in)   # the same A rows, for the fused kernel
    b = torch.randn(NUM_LAYERS, LORAS, out, n * RANK, device="cuda", dtype=dt) * 0.01
    bounds = torch.tensor([sum(shards[:i]) for i in range(n + 1)], dtype=torch.int32, device="cuda")
    cfg = layer_config(fan_in, max_shard, RANK)
    for T in (16, 232, 256):
        x = torch.randn(T, fan_in, device="cuda", dtype=dt)
        y = torch.zeros(T, out, device="cuda", dtype=dt)
        wide = torch.zeros(T, out + extra, device="cuda", dtype=dt)
        t = wide[:, out:].unsqueeze(0)   # (1, T, LORAS n R): a row stride of out + extra
        order, slots = slot_buffers(T, True, False)
        gemm = graph_us(lambda i: torch.matmul(x, weight[i, :out].t(), out=y))
        fused = graph_us(lambda i: (torch.matmul(x, weight[i, :out].t(), out=y),
                                    lora_fused(y, x, a[i], b[i], order, slots, bounds, max_shard, RANK, config=cfg)))
        expand = graph_us(lambda i: (torch.matmul(x, weight[i].t(), out=wide),
                                     lora_expand(wide[:, :out], t, b[i], order, slots, bounds, max_shard, RANK,
                                                 slot_stride=n * RANK)))
        line = {"layer": name, "T": T, "gemm_us": gemm, "lora_fused_us": round(fused - gemm, 2),
                "lora_wide_gemm_us": round(expand - gemm, 2)}
        for k in ("lora_fused_us", "lora_wide_gemm_us"):
            totals[(T, k)] = totals.get((T, k), 0.0) + line[k]
        print(json.dumps(line), flush=True)


def main():
    global APART, PACKED
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers-apart", action="store_true",
                        help="each of 28 calls on its own layer's weights and adapters, as in a step (out of L2)")
    parser.add_argument("--packed", action="store_true", help="adapters' token runs end to end (the old layout)")
    parser.add_argument("--wide-gemm", action="store_true",
                        help="only the LoRA cost with A appended to the base weight (bench_wide_gemm) vs fused")
    args = parser.parse_args()
    APART, PACKED = args.layers_apart, args.packed
    if args.wide_gemm:
        wide_totals = {}
        for name, (fan_in, shards) in LAYERS.items():
            bench_wide_gemm(name, fan_in, shards, wide_totals)
        for T in (16, 232, 256):
            print(json.dumps({"step_ms": f"x{NUM_LAYERS} layers, LoRA over the base GEMMs", "T": T,
                              **{k: round(wide_totals[(T, k)] * NUM_LAYERS / 1e3, 3)
                                 for k in ("lora_fused_us", "lora_wide_gemm_us")}}), flush=True)
        return
    totals, sweep, programs = {}, {}, {}
    for name, (fan_in, shards) in LAYERS.items():
        bench_layer(name, fan_in, shards, totals, sweep, programs)
    keys = [p or "default" for p in PROGRAMS]
    for T in sorted({T for _, T in programs}):
        print(json.dumps({"programs_step_ms": f"x{NUM_LAYERS} layers, default tiles", "T": T,
                          **{str(p): round(programs[(p, T)] * NUM_LAYERS / 1e3, 3) for p in keys}}),
              flush=True)
    for (T, case), t in totals.items():
        print(json.dumps({"step_ms": f"x{NUM_LAYERS} layers", "T": T, "case": case,
                          **{k: round(v * NUM_LAYERS / 1e3, 3) for k, v in t.items()}}), flush=True)
    print(json.dumps(recommend(totals, sweep)), flush=True)


def recommend(totals: dict, sweep: dict) -> dict:
    """The path with the least T = 232 plus T = 16 decode time a step: split, the fused default, or the fused
    kernel at the best tiles over the four layers; `env` is what selects it (the default, auto, takes the wide
    GEMM where it fits: --wide-gemm times that)."""
    def step_ms(us: float) -> float:
        return round(us * NUM_LAYERS / 1e3, 3)
    per_tiles = {k: sum(sweep[(k, T)] for T in SWEEP_T) for k, _ in sweep}
    best = min(per_tiles, key=per_tiles.get)
    ms = {path: step_ms(sum(totals[(T, "decode")][path] for T in SWEEP_T)) for path in ("split", "fused")}
    ms["fused_best"] = step_ms(per_tiles[best])
    env = {"split": "PAGEDLLM_LORA_KERNEL=split", "fused": "PAGEDLLM_LORA_KERNEL=fused",
           "fused_best": f"PAGEDLLM_LORA_KERNEL=fused PAGEDLLM_LORA_FUSED_CONFIG={best}"}
    pick = min(ms, key=ms.get)
    if pick == "fused_best" and ms["fused_best"] > 0.95 * ms["fused"]:   # within noise: keep the default
        pick = "fused"
    return {"T16+T232_step_ms": ms, "best_tiles": best, "pick": pick, "env": env[pick]}


if __name__ == "__main__":
    main()
