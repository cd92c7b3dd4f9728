"""Long-context prefill attention on one GPU: TFLOP/s by context length against the bf16 roofline.

    PYTHONPATH=$PWD python3 benchmarks/prefill_long.py [--probe] [--only 8k,16k] [--chunks [--no-prebuild]]
        [--kernels cudnn,fa4]

Rows are fresh causal prompts of 4k-32k tokens and chunks of a long prompt whose context is already cached
(W4's shape: 8,192 new tokens after 24,576 cached). Each line: a method, its median time (triton.testing.do_bench,
CUDA events), attention TFLOP/s (causal: only visible (query, key) pairs count) and the share of the dense bf16
peak, and its relative error against pagedllm's Triton kernel. --probe also times library kernels on
contiguous or gathered K/V (PyTorch's SDPA backends and its varlen flash / cuDNN ops) to pick a path.
--chunks replays W4's prefill rows in the engine's order (one layer): Triton alone against the cuDNN path with
its plan pre-built (or, --no-prebuild, built at the first long row). --kernels: the long rows' kernels to time
(cudnn_prefill.KERNEL; fa4 needs the flash-attn-4 package).
"""
import argparse
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kernels"))
from attention_cases import make_batch, rel_error
from attention_kernels import attention_flops

from pagedllm.attention import cudnn_prefill, fa4_prefill, triton_backend

PEAK_TFLOPS = 989.0      # H100/H200 SXM dense bf16 tensor-core peak


def cases():
    """(name, rows (seq_len, query_len), Hq, Hkv, head_dim)."""
    yield "fresh 512 x 16 Qwen3-0.6B", [(512, 512)] * 16, 16, 8, 128
    yield "fresh 1k x 16 Qwen3-0.6B", [(1024, 1024)] * 16, 16, 8, 128
    yield "fresh 2k x 8 Qwen3-0.6B", [(2048, 2048)] * 8, 16, 8, 128
    yield "chunk 1k after 15k x 4 Qwen3-0.6B", [(16384, 1024)] * 4, 16, 8, 128
    for n in (4096, 8192, 16384, 32768):
        yield f"fresh {n // 1024}k Qwen3-0.6B", [(n, n)] * max(1, 16384 // n), 16, 8, 128
    yield "chunk 8k after 24k Qwen3-0.6B", [(32768, 8192)], 16, 8, 128
    yield "chunk 2k after 28k Qwen3-0.6B", [(30720, 2048)] * 4, 16, 8, 128
    yield "fresh 16k Llama-8B", [(16384, 16384)], 32, 8, 128
    yield "chunk 8k after 24k Llama-8B", [(32768, 8192)], 32, 8, 128
    yield "fresh 16k hd64", [(16384, 16384)], 32, 8, 64


def gathered_kv(batch, rows):
    """Each row's whole K/V (context from the cache + this step's), packed (total, Hkv, D), and cu_seqlens."""
    block_size = batch.kv_cache.shape[2]
    slots = []
    for i, (seq_len, _) in enumerate(rows):
        pos = torch.arange(seq_len, device="cuda")
        slots.append(batch.ref_meta.block_tables[i].long()[pos // block_size] * block_size + pos % block_size)
    slots = torch.cat(slots)
    hkv, d = batch.kv_cache.shape[3:]
    k_flat, v_flat = (batch.kv_cache[j].view(-1, hkv, d) for j in (0, 1))
    cu_k = torch.tensor([0] + [s for s, _ in rows], device="cuda").cumsum(0).to(torch.int32)
    return (lambda: (k_flat.index_select(0, slots), v_flat.index_select(0, slots))), cu_k


def probe(batch, rows, hq, hkv, scale, ref, report):
    q = batch.q
    fresh = all(s == ql for s, ql in rows)
    cu_q = batch.meta.query_start_loc
    max_q, max_k = max(ql for _, ql in rows), max(s for s, _ in rows)
    gather, cu_k = gathered_kv(batch, rows)
    k, v = gather()
    report("gather K/V (index_select)", gather, None)
    starts = batch.meta.query_start_loc_cpu

    if fresh:
        def sdpa(backend, gqa):
            def run():
                outs = []
                with torch.nn.attention.sdpa_kernel(backend):
                    for i in range(len(rows)):
                        sl = slice(starts[i], starts[i + 1])
                        qi, ki, vi = (x[sl].transpose(0, 1)[None] for x in (q, k, v))
                        if not gqa:
                            ki, vi = (x.repeat_interleave(hq // hkv, dim=1) for x in (ki, vi))
                        outs.append(F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale,
                                                                   enable_gqa=gqa)[0].transpose(0, 1))
                return torch.cat(outs)
            return run
        B = torch.nn.attention.SDPBackend
        report("sdpa flash, gqa", sdpa(B.FLASH_ATTENTION, True), ref)
        report("sdpa cudnn, gqa", sdpa(B.CUDNN_ATTENTION, True), ref)

    def fa2_varlen():
        return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, True, False,
                                                       scale=scale)[0]
    report("aten flash varlen (FA2), gathered", fa2_varlen, ref)

    def cudnn_varlen(kk, vv):
        def run():
            return torch.ops.aten._cudnn_attention_forward(q, kk, vv, None, cu_q, cu_k, max_q, max_k, False,
                                                           0.0, True, False, scale=scale)[0]
        return run
    if fresh:
        report("aten cudnn varlen, gathered", cudnn_varlen(k, v), ref)


def chunked_rows(num_prompts: int = 32, prompt_len: int = 30000, budget: int = 16384,
                 output_len: int = 256) -> list[tuple[int, int]]:
    """(query_len, context) of each prefill row as the scheduler cuts W4 (the defaults): running requests first
    (a decoding one takes a token of the budget a step), then waiting prompts in order, budget tokens a step."""
    left, decoding, rows = [prompt_len] * num_prompts, [0] * num_prompts, []
    while any(left):
        budget_left = budget - sum(d > 0 for d in decoding)
        decoding = [max(d - 1, 0) for d in decoding]
        for i in range(num_prompts):
            if left[i] and budget_left > 0:
                n = min(left[i], budget_left)
                rows.append((n, prompt_len - left[i]))
                left[i] -= n
                budget_left -= n
                decoding[i] = 0 if left[i] else output_len - 1
    return rows


def available(kernel: str) -> bool:
    library = cudnn_prefill._frontend() if kernel == "cudnn" else fa4_prefill.interface()
    return cudnn_prefill._sm90(torch.device("cuda")) and library is not None


def chunk_sequence(prebuild: bool, kernels: list[str]):
    """W4's prefill rows in the engine's order (chunked_rows), one layer of Qwen3-0.6B heads, bf16: the Triton
    kernel alone, then each long-row kernel twice (the first pass builds the plan if it was not pre-built)."""
    from pagedllm.attention.metadata import AttentionMetadata
    rows, hq, hkv, dim, block_size = chunked_rows(output_len=1), 16, 8, 128, 16
    cache = torch.randn(2, 32768 // block_size, block_size, hkv, dim, device="cuda", dtype=torch.bfloat16)
    table = torch.arange(32768 // block_size, device="cuda", dtype=torch.int32)[None]
    q = torch.randn(16384, hq, dim, device="cuda", dtype=torch.bfloat16)
    metas = [AttentionMetadata(torch.zeros(n, dtype=torch.int64, device="cuda"),
                               torch.tensor([0, n], dtype=torch.int32, device="cuda"),
                               torch.tensor([c + n], dtype=torch.int32, device="cuda"), table, n, c + n,
                               [0, n], [c + n]) for n, c in rows]

    def run_all() -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        for (n, _), meta in zip(rows, metas):
            triton_backend.paged_attention(q[:n], cache, meta, dim ** -0.5)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    tflop = attention_flops([(c + n, n) for n, c in rows], hq, dim) / 1e12
    cudnn_prefill.ENABLED = False
    run_all()                                   # compiles the Triton kernels
    triton_s = run_all()
    print(f"W4 chunks, 1 layer: {len(rows)} rows, {tflop:.1f} TFLOP | triton "
          f"{triton_s * 1e3:.0f} ms ({tflop / triton_s:.0f} TFLOP/s)")
    cudnn_prefill.ENABLED = True
    for kernel in kernels:
        cudnn_prefill.KERNEL = kernel
        if not available(kernel):
            print(f"  {kernel}: not available")
            continue
        plans, build_s = 0, 0.0
        if prebuild:
            start = time.perf_counter()
            plans = cudnn_prefill.prebuild_plans(hq, hkv, dim, torch.bfloat16, torch.device("cuda"), 16384, 32768)
            build_s = time.perf_counter() - start
        if not cudnn_prefill.ENABLED or cudnn_prefill.KERNEL != kernel:   # the build failed (logged): these rows
            print(f"  {kernel}: prebuild failed")                         # would time another kernel
            cudnn_prefill.ENABLED, cudnn_prefill.KERNEL = True, kernel
            continue
        first, second = run_all(), run_all()
        print(f"  {kernel}: prebuilt {plans} in {build_s:.1f} s, first pass {first * 1e3:.0f} ms, second "
              f"{second * 1e3:.0f} ms ({tflop / second:.0f} TFLOP/s)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probe", action="store_true", help="also time library kernels")
    parser.add_argument("--chunks", action="store_true", help="replay W4's prefill rows (one layer), then stop")
    parser.add_argument("--no-prebuild", action="store_true", help="--chunks without pre-building the plans")
    parser.add_argument("--only", default="", help="comma-separated words: run only cases whose name has one")
    parser.add_argument("--kernels", default="cudnn", help="comma-separated long-row kernels: cudnn, fa4")
    args = parser.parse_args()
    kernels = args.kernels.split(",")
    if args.chunks:
        return chunk_sequence(not args.no_prebuild, kernels)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, cudnn {torch.backends.cudnn.version()}")
    if args.probe:
        for op in ("_flash_attention_forward", "_cudnn_attention_forward"):
            schema = getattr(torch.ops.aten, op).default._schema if hasattr(torch.ops.aten, op) else "absent"
            print(f"{op}: {str(schema)[:300]}")
        for impl in torch.nn.attention.list_flash_attention_impls():
            try:
                torch.nn.attention.activate_flash_attention_impl(impl)
                print(f"flash impl {impl}: activated")
            except Exception as e:
                print(f"flash impl {impl}: {repr(e)[:120]}")
    for name, rows, hq, hkv, head_dim in cases():
        if args.only and not any(word in name for word in args.only.split(",")):
            continue
        batch = make_batch(rows, hq, hkv, head_dim, 16, torch.bfloat16, "cuda", seed=0)
        scale = head_dim ** -0.5
        triton_backend.write_kv(batch.kv_cache, batch.k, batch.v, batch.meta.slot_mapping)
        flops = attention_flops(rows, hq, head_dim)
        print(f"\n{name}: {batch.q.shape[0]} query tokens, {flops / 1e12:.2f} TFLOP")

        def report(label, fn, ref):
            try:
                out = fn()
                ms = do_bench(fn, warmup=5, rep=40, return_mode="median")
            except Exception as e:
                msg = traceback.format_exception_only(e)[-1].strip()
                print(f"  {label:36s} failed: {msg[:160]}")
                return None
            err = f"err {rel_error(out, ref):.1e}" if ref is not None else ""
            tf = flops / ms / 1e9
            print(f"  {label:36s} {ms * 1e3:9.0f} us {tf:6.0f} TFLOP/s ({tf / PEAK_TFLOPS:4.0%})  {err}")
            return out

        def ours(q=batch.q):
            return triton_backend.paged_attention(q, batch.kv_cache, batch.meta, scale)
        cudnn_prefill.ENABLED = False
        ref = report("triton kernel only", ours, None)
        cudnn_prefill.ENABLED = True
        for kernel in kernels:
            cudnn_prefill.KERNEL = kernel
            if available(kernel):
                report(f"pagedllm ({kernel} for long rows)", ours, ref)
        cudnn_prefill.KERNEL = "cudnn"
        if args.probe:
            # q as the model has it: a view of the fused qkv projection's output
            qkv = torch.cat([batch.q.flatten(1), batch.k.flatten(1), batch.v.flatten(1)], dim=1)
            report("pagedllm, q a view of qkv", lambda: ours(qkv[:, :hq * head_dim].view_as(batch.q)), ref)
            original = triton_backend._prefill_config
            cudnn_prefill.ENABLED = False
            for config in ((128, 128, 8, 2),):
                triton_backend._prefill_config = lambda dtype, hd, c=config: c
                report(f"triton kernel only {config}", ours, ref)
            triton_backend._prefill_config = original
            cudnn_prefill.ENABLED = True
            probe(batch, rows, hq, hkv, scale, ref, report)
        batch = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
