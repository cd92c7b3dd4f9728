"""All-reduce latency of the tensor-parallel group, as a step pays it: one JSON line per message size.

    python -m pagedllm.bench.allreduce --tensor-parallel-size 2 [--device cuda] [--dtype bfloat16]

A decode step of a Llama-shaped model all-reduces 2 x num_layers + 1 messages of (rows x hidden) elements (o_proj
and down_proj each layer, the embedding once): at 8 rows x 4096 bf16 that is 64 KiB; 512 B is vLLM's anchor (its
custom all-reduce: 9-10 us on H200s, NCCL slower for small messages). `eager_us`: a loop of launches timed with
events; `graph_us` (CUDA): the same calls replayed from one CUDA graph, as the engine's decode graphs run them.
"""
import argparse
import json

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SIZES = (512, 4096, 65536, 1 << 20, 16 << 20)   # bytes


def _time(fn, iters: int, device: torch.device) -> float:
    """Microseconds per call (host wall time on CPU; device events on CUDA)."""
    import time
    fn()
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - start) / iters * 1e6
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters * 1e3


def _rank_main(rank: int, size: int, init_method: str, device_type: str, dtype: str, iters: int):
    from pagedllm.distributed.parallel_state import init_tp, rank_device
    device = rank_device(torch.device(device_type), rank)
    tp = init_tp(rank, size, init_method, device)
    dt = getattr(torch, dtype)
    for nbytes in SIZES:
        x = torch.ones(nbytes // dt.itemsize, dtype=dt, device=device)
        row = {"tensor_parallel_size": size, "device": device_type, "dtype": dtype, "bytes": nbytes,
               "eager_us": round(_time(lambda: tp.all_reduce(x), iters, device), 2)}
        if device.type == "cuda":
            graph = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                tp.all_reduce(x)   # warm-up outside capture
                stream.synchronize()
                with torch.cuda.graph(graph, stream=stream):
                    for _ in range(10):
                        tp.all_reduce(x)
            row["graph_us"] = round(_time(graph.replay, max(iters // 10, 1), device) / 10, 2)
        if rank == 0:
            print(json.dumps(row), flush=True)
    dist.barrier(group=tp.cpu_group)
    dist.destroy_process_group()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensor-parallel-size", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--iters", type=int, default=200)
    args = parser.parse_args(argv)
    from pagedllm.distributed.executor import free_port
    init_method = f"tcp://127.0.0.1:{free_port()}"
    mp.spawn(_rank_main, args=(args.tensor_parallel_size, init_method, args.device, args.dtype, args.iters),
             nprocs=args.tensor_parallel_size)


if __name__ == "__main__":
    main()
