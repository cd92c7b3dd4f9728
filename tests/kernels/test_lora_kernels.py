"""LoRA shrink/expand kernels against a float64 per-token, per-shard torch computation (lora_cases.py): on CUDA,
and on CPU through the Triton interpreter in a subprocess (TRITON_INTERPRET is read when kernels are decorated)."""
import pytest
import torch
from kernel_checks import run_under_interpreter
from lora_cases import check_lora, interpreter_cases, request_slots, slot_metadata

from pagedllm.lora.layers import sorted_len

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (in_features, shard sizes): Qwen3-0.6B's qkv, gate_up, o, down; an odd fused layer
LAYERS = [(1024, (2048, 1024, 1024)), (1024, (3072, 3072)), (2048, (1024,)), (3072, (1024,)), (896, (896, 128, 128))]


def test_kernels_under_triton_interpreter():
    pytest.importorskip("triton")
    stdout = run_under_interpreter("lora_cases.py", timeout=300)
    assert stdout.count("ok ") == len(list(interpreter_cases())), stdout


@pytest.fixture(scope="module")
def engine_paths_output() -> str:
    """Both paths' engines in one interpreter process: the model, adapters and PEFT references made once."""
    pytest.importorskip("triton")
    pytest.importorskip("peft")
    return run_under_interpreter("lora_engine_cases.py", 600, "fused", "wide", check=False)


@pytest.mark.parametrize("path", ["fused", "wide"])
def test_engine_through_kernels_under_triton_interpreter(engine_paths_output, path):
    """The engine's LoRA steps through the kernels (on CPU tensors) give transformers + PEFT's tokens (~20 s
    both); wide: PAGEDLLM_LORA_KERNEL=wide's layers (the slots' A rows in the base GEMM, then the expand)."""
    assert f"ok engine {path}\n" in engine_paths_output, engine_paths_output


def test_kernels_compile_for_hopper():
    """Without a GPU: the three kernels through Triton's compiler and ptxas for sm_90 (the interpreter checks the
    math only), in every dtype and at ranks that take one, two and a partial rank block."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pagedllm.lora import kernels
    from pagedllm.lora.fused import lora_fused_kernel
    common = {"order_ptr": "*i32", "slots_ptr": "*i32", "n_sorted": "i32"}
    for dt in ("bf16", "fp16", "fp32"):
        shrink = {"x_ptr": f"*{dt}", "a_ptr": f"*{dt}", "t_ptr": "*fp32", **common, "K": "i32", "N": "i32",
                  **dict.fromkeys(("stride_xm", "stride_as", "stride_an", "stride_ts", "stride_tm"), "i32")}
        expand = {"t_ptr": "*fp32", "b_ptr": f"*{dt}", "y_ptr": f"*{dt}", **common, "bounds_ptr": "*i32",
                  **dict.fromkeys(("stride_ts", "stride_tm", "stride_tslot", "stride_bs", "stride_bo", "stride_ym"),
                                  "i32")}
        # the launch's argument order: pointers, T, then the rest
        expand = {k: expand[k] for k in ("t_ptr", "b_ptr", "y_ptr", "order_ptr", "slots_ptr", "bounds_ptr", "n_sorted",
                                         "stride_ts", "stride_tm", "stride_tslot", "stride_bs", "stride_bo",
                                         "stride_ym")}
        precision = "ieee" if dt == "fp32" else "tf32"
        cases = [(kernels.lora_shrink_kernel, shrink, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=kernels.SHRINK_BLOCK_K,
                                                          K_PER_SPLIT=kernels.K_PER_SPLIT, PRECISION=precision))]
        cases += [(kernels.lora_expand_kernel, expand, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_R=block_r, R=r,
                                                           NUM_SPLITS=splits, PRECISION=precision))
                  for r, block_r, splits in ((16, 16, 12), (64, 64, 4), (80, 64, 3))]
        fused = {"x_ptr": f"*{dt}", "a_ptr": f"*{dt}", "b_ptr": f"*{dt}", "y_ptr": f"*{dt}", **common,
                 "bounds_ptr": "*i32", "K": "i32", "n_tiles": "i32",
                 **dict.fromkeys(("stride_xm", "stride_as", "stride_an", "stride_bs", "stride_bo", "stride_ym"), "i32")}
        fused = {k: fused[k] for k in ("x_ptr", "a_ptr", "b_ptr", "y_ptr", "order_ptr", "slots_ptr", "bounds_ptr",
                                       "n_sorted", "K", "n_tiles", "stride_xm", "stride_as", "stride_an",
                                       "stride_bs", "stride_bo", "stride_ym")}
        cases += [(lora_fused_kernel, fused, dict(BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=128, BLOCK_R=block_r, R=r,
                                                  EVEN_K=even, PRECISION=precision))
                  for r, block_r, block_n, even in ((16, 16, 256, True), (64, 64, 128, False))]
        for fn, sig, consts in cases:
            src = ASTSource(fn=fn, signature={**sig, **dict.fromkeys(consts, "constexpr")}, constexprs=consts)
            compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
            assert "ld.local" not in compiled.asm["ptx"], f"{fn.__name__} {dt} {consts}: registers spill"


def test_fused_configs_fit_hopper_shared_memory():
    """The fused kernel's default tiles per layer and dtype at rank 64 (the largest B and A tiles) compile for
    sm_90 within its shared memory (227 KB; float32 at 256-wide K steps and 4 stages took 276 KB and failed to
    launch on the H200), and shared_memory_bytes bounds what the compiler allocates."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pagedllm.lora.fused import SMEM_BUDGET, layer_config, lora_fused_kernel, shared_memory_bytes
    names = ("x_ptr", "a_ptr", "b_ptr", "y_ptr", "order_ptr", "slots_ptr", "bounds_ptr", "n_sorted", "K",
             "n_tiles", "stride_xm", "stride_as", "stride_an", "stride_bs", "stride_bo", "stride_ym")
    for dt, elem in (("fp32", 4), ("bf16", 2)):
        sig = {n: (f"*{dt}" if n in ("x_ptr", "a_ptr", "b_ptr", "y_ptr") else "*i32" if n.endswith("_ptr")
                   else "i32") for n in names}
        for fan_in, shards in LAYERS[2:4]:   # o and down: the 256-wide K steps
            cfg = layer_config(fan_in, max(shards), 64, elem)
            consts = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=64, R=64,
                          EVEN_K=True, PRECISION="ieee" if dt == "fp32" else "tf32")
            src = ASTSource(fn=lora_fused_kernel, signature={**sig, **dict.fromkeys(consts, "constexpr")},
                            constexprs=consts)
            compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
            estimate = shared_memory_bytes(cfg, 64, elem)
            assert estimate <= SMEM_BUDGET, (dt, fan_in, cfg)
            assert compiled.metadata.shared <= estimate, (dt, fan_in, cfg, compiled.metadata.shared)


def kernel_fn(name: str):
    from pagedllm.lora.fused import lora_fused
    from pagedllm.lora.kernels import add_lora
    return {"fused": lora_fused, "split": add_lora}[name]


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["fused", "split"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layer", LAYERS, ids=str)
@pytest.mark.parametrize("rank", [8, 16, 64])
@pytest.mark.parametrize("num_tokens,decode", [(1, True), (7, False), (16, True), (256, True), (1000, False),
                                               (8192, False)])
def test_lora_kernels(kernel, dtype, layer, rank, num_tokens, decode):
    in_features, shards = layer
    check_lora(num_tokens, in_features, shards, rank, 8, dtype, "cuda", seed=num_tokens + rank, decode=decode,
               kernel=kernel_fn(kernel))


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["fused", "split"])
@torch.no_grad()
def test_lora_kernels_in_cuda_graph(kernel):
    """Captured once at T=256 with persistent slot buffers, replayed under new slot assignments (some steps all
    base): bit-identical to eager calls, base rows untouched."""
    add_lora = kernel_fn(kernel)
    T, rank, dev = 256, 16, "cuda"   # Qwen3-0.6B qkv: shards 2048, 1024, 1024
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, 1024, device=dev, dtype=torch.bfloat16)
    a = torch.randn(8, 3 * rank, 1024, device=dev, dtype=torch.bfloat16) / 32
    b = torch.randn(8, 4096, 3 * rank, device=dev, dtype=torch.bfloat16)
    y0 = torch.randn(T, 4096, device=dev, dtype=torch.bfloat16)
    bounds = torch.tensor([0, 2048, 3072, 4096], dtype=torch.int32, device=dev)
    n = sorted_len(T, 8)
    order, sorted_slots = torch.zeros(n, dtype=torch.int32, device=dev), torch.full((n,), -1, device=dev,
                                                                                    dtype=torch.int32)
    y = y0.clone()

    def step():
        y.copy_(y0)
        add_lora(y, x, a, b, order, sorted_slots, bounds, 2048, rank)

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for i in range(6):
        slots = request_slots(T, 8, gen, decode=i % 2 == 0) if i != 3 else torch.full((T,), -1)
        o, s = slot_metadata(slots, 8)
        order.copy_(o)
        sorted_slots.copy_(s)
        graph.replay()
        want = y0.clone()
        add_lora(want, x, a, b, o.to(dev), s.to(dev), bounds, 2048, rank)
        assert torch.equal(y, want)
        base = (slots < 0).to(dev)
        assert torch.equal(y[base], y0[base])
