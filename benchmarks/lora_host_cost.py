"""Host time of LoRA's per-step and per-adapter work, apart from the kernels (issue 20), one JSON line:

  prepare_step  LoRAManager.prepare_step a call (median): a 256-row decode step repeated (the buffer kept), one whose
                rows changed, a 2,048-token mixed step; 8 adapters round-robin, and base rows
  load          an adapter's read (LoRAManager.load: file, sha256, checks, float32) and its staging as the manager does
                it (cast, then one pinned allocation a tensor on CUDA), against one pinned buffer for all its tensors
  fill          putting an adapter into a device slot (LoRAManager._fill: zeroes and copies, every layer)

    GPU:  python benchmarks/lora_host_cost.py .device/models/Qwen--Qwen3-0.6B
    CPU:  python benchmarks/lora_host_cost.py --device cpu      (Qwen3-0.6B's shapes, bf16 slots)
"""
import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lora_throughput import CONFIG_DIR, write_adapter
from pagedllm import LLM, LoRARequest
from pagedllm.lora.peft_loader import load_peft_adapter


def median_us(fn, n: int) -> float:
    times = []
    for k in range(n):
        start = time.perf_counter()
        fn(k)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e6, 1)


def one_buffer(lora, dtype: torch.dtype, pin: bool):
    """The staging alternative: every tensor a view of one (pinned) buffer, cast by the copy."""
    pairs = [(a, b) for shards in lora.modules.values() for a, b in shards.values()]
    flat = torch.empty(sum(a.numel() + b.numel() for a, b in pairs), dtype=dtype, pin_memory=pin)
    at = 0
    for a, b in pairs:
        for t in (a, b):
            flat[at:at + t.numel()].view(t.shape).copy_(t)
            at += t.numel()
    return flat


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default=str(CONFIG_DIR), help="model directory (weights are dummy)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lora_host_"))
    try:
        cfg = json.loads((Path(args.model) / "config.json").read_text())
        loras = [LoRARequest(f"lora{i}", i + 1, write_adapter(tmp / f"lora{i}", cfg, 16, seed=i))
                 for i in range(8 + 2 * args.reps)]
        llm = LLM(args.model, load_format="dummy", device=args.device, dtype="bfloat16", max_model_len=4096,
                  enable_lora=True, max_loras=8, max_lora_rank=16, enforce_eager=True, log_stats_interval=0,
                  gpu_memory_utilization=0.5)
        run(llm.engine.runner.lora, loras, args.reps)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(m, loras, reps: int):
    sync = torch.cuda.synchronize if m.device.type == "cuda" else (lambda: None)
    rows = [f"req-{i}" for i in range(256)]
    for i, r in enumerate(rows):
        m.acquire(r, loras[i % 8])
    base = [f"base-{i}" for i in range(256)]
    m.prepare_step(rows, [1] * 256, 256)   # fills the 8 slots
    prep = {
        "decode_repeated": median_us(lambda k: m.prepare_step(rows, [1] * 256, 256), 2000),
        "decode_changed": median_us(lambda k: m.prepare_step(rows[:255 - k % 2], [1] * (255 - k % 2), 256), 2000),
        "mixed_2048_changed": median_us(lambda k: m.prepare_step(rows[:32 - k % 2], [64] * (32 - k % 2), 2048), 500),
        "decode_base_rows": median_us(lambda k: m.prepare_step(base[:255 - k % 2], [1] * (255 - k % 2), 256), 2000)}
    sync()
    dtype, pin = next(iter(m.layers.values())).lora_a.dtype, m.device.type == "cuda"
    load = {"read_ms": [], "stage_ms": [], "one_buffer_ms": []}
    for k in range(reps):
        start = time.perf_counter()
        lora = load_peft_adapter(loras[8 + 2 * k], m.model, m.max_lora_rank)
        load["read_ms"].append(round((time.perf_counter() - start) * 1e3, 1))
        start = time.perf_counter()
        m._staged(lora)
        load["stage_ms"].append(round((time.perf_counter() - start) * 1e3, 1))
        lora = load_peft_adapter(loras[9 + 2 * k], m.model, m.max_lora_rank)
        start = time.perf_counter()
        one_buffer(lora, dtype, pin)
        load["one_buffer_ms"].append(round((time.perf_counter() - start) * 1e3, 1))
    fill = []
    for k in range(reps):
        sync()
        start = time.perf_counter()
        m._fill(k % 8, loras[(k + 1) % 8].lora_int_id)   # host time; the copies run on after it returns
        fill.append(round((time.perf_counter() - start) * 1e3, 2))
    sync()
    print(json.dumps({"device": str(m.device), "prepare_step_us": prep, "load": load, "fill_host_ms": fill}))


if __name__ == "__main__":
    main()
