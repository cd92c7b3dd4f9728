"""The LoRA kernels (fused: pagedllm/lora/fused.py; shrink/expand: pagedllm/lora/kernels.py) against a plain
torch computation on random inputs.

Shared by the GPU tests and by the Triton-interpreter run on CPU (`python tests/kernels/lora_cases.py` with
TRITON_INTERPRET=1, a process of its own). Oracle: float64 (x A[s]^T) B[s]^T with each shard's A rows
and B block built separately (not through the stacked, block-diagonal layout the kernels read), plus y.
Base tokens (slot -1) must come back bit-identical; the rest within the dtype's rounding of y and t.
"""
import functools

import numpy as np
import torch

from pagedllm.lora.kernels import add_lora as split
from pagedllm.lora.layers import sort_by_slot, sorted_len
from pagedllm.lora.ops import add_lora

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}   # relative, per token row


def slot_metadata(token_slots: torch.Tensor, num_slots: int, packed: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, sorted_slots) int32 as the manager builds them (sort_by_slot: each slot's run from a tile's start);
    packed: the runs end to end, base tokens last (several adapters a tile: the kernels' loop over a tile's slots)."""
    if packed:
        key = torch.where(token_slots < 0, 1 << 30, token_slots)
        order = torch.sort(key, stable=True).indices
        return order.to(torch.int32), token_slots[order].to(torch.int32)
    n = sorted_len(len(token_slots), num_slots)
    order, sorted_slots = np.empty(n, np.int32), np.empty(n, np.int32)
    sort_by_slot(token_slots.numpy(), num_slots, order, sorted_slots)
    return torch.from_numpy(order), torch.from_numpy(sorted_slots)


def request_slots(num_tokens: int, num_loras: int, gen: torch.Generator, decode: bool) -> torch.Tensor:
    """Per-token slots of a step: decode, every token its own request; else contiguous requests of random
    lengths. About a quarter of the requests are base (-1)."""
    slots = torch.empty(num_tokens, dtype=torch.int64)
    start = 0
    while start < num_tokens:
        n = 1 if decode else int(torch.randint(1, max(2, num_tokens // 3), (1,), generator=gen))
        s = int(torch.randint(-1, num_loras, (1,), generator=gen)) if torch.rand(1, generator=gen) > 0.25 else -1
        slots[start:start + n] = s
        start += n
    return slots


def check_lora(num_tokens: int, in_features: int, shard_sizes: tuple[int, ...], rank: int, num_loras: int,
               dtype: torch.dtype, device: str, seed: int, decode: bool = False, kernel=add_lora,
               packed: bool = False) -> float:
    gen = torch.Generator().manual_seed(seed)
    n, out = len(shard_sizes), sum(shard_sizes)
    x = torch.randn(num_tokens, in_features, generator=gen)
    y0 = torch.randn(num_tokens, out, generator=gen)
    # each shard's A (r, in) and B (out_i, r); true ranks below the padded rank leave zero columns
    shards = [[(torch.randn(rank, in_features, generator=gen) / in_features ** 0.5,
                torch.randn(size, rank, generator=gen)) for size in shard_sizes] for _ in range(num_loras)]
    lora_a = torch.zeros(num_loras, n * rank, in_features)
    lora_b = torch.zeros(num_loras, out, n * rank)
    for s, per_shard in enumerate(shards):
        for i, (a, b) in enumerate(per_shard):
            row = sum(shard_sizes[:i])
            lora_a[s, i * rank:(i + 1) * rank] = a
            lora_b[s, row:row + b.shape[0], i * rank:(i + 1) * rank] = b
    slots = request_slots(num_tokens, num_loras, gen, decode)
    x, y0, lora_a, lora_b = (v.to(device, dtype) for v in (x, y0, lora_a, lora_b))
    ref = _reference(x, y0, shards, slots, shard_sizes)
    order, sorted_slots = (v.to(device) for v in slot_metadata(slots, num_loras, packed))
    bounds = torch.tensor([sum(shard_sizes[:i]) for i in range(n + 1)], dtype=torch.int32, device=device)
    y = y0.clone()
    kernel(y, x, lora_a, lora_b, order, sorted_slots, bounds, max(shard_sizes), rank)
    base = (slots < 0).to(device)
    assert torch.equal(y[base], y0[base]), "base rows changed"
    if not (~base).any():
        return 0.0
    got, want = y[~base].double().cpu(), ref[~base.cpu()]
    delta = want - y0[~base].double().cpu()
    err = ((got - want).norm(dim=1) / delta.norm(dim=1).clamp_min(1e-30)).max().item()
    assert err <= TOLERANCE[dtype], f"relative error {err:.2e} > {TOLERANCE[dtype]:.0e}"
    return err


def _reference(x, y0, shards, slots, shard_sizes) -> torch.Tensor:
    """float64 on the host, adapter by adapter and shard by shard."""
    dtype, x, ref = x.dtype, x.double().cpu(), y0.double().cpu().clone()
    for s, per_shard in enumerate(shards):
        rows = slots == s
        row = 0
        for size, (a, b) in zip(shard_sizes, per_shard):
            a, b = a.to(dtype).double(), b.to(dtype).double()   # the adapter as the kernels hold it
            ref[rows, row:row + size] += (x[rows] @ a.t()) @ b.t()
            row += size
    return ref


def wide_gemm(y, x, lora_a, lora_b, order, sorted_slots, bounds, max_shard, rank):
    """add_lora's result the --wide-gemm way (benchmarks/lora_kernels.py): one GEMM gives the base output and
    x times every slot's A rows beside it (row stride out + slots x shards x R), then the expand alone reads each
    row's slot's columns (slot_stride) and adds into the base columns, a strided view."""
    from pagedllm.lora.kernels import lora_expand
    num_loras, n_rank, _ = lora_a.shape
    out = y.shape[1]
    wide = torch.cat([y, x @ lora_a.reshape(num_loras * n_rank, -1).t()], dim=1)
    lora_expand(wide[:, :out], wide[:, out:].unsqueeze(0), lora_b, order, sorted_slots, bounds, max_shard, rank,
                slot_stride=n_rank)
    y.copy_(wide[:, :out])
    return y


def check_shared_a_layer(path: str, seed: int = 40) -> float:
    """LoRALinear with shared_a (Phi-3's fused modules: one A for all shards, held once, B spanning them) through
    `path`'s kernels (the layer's own call, CPU tensors) against the float64 oracle, and the same layer holding
    that A once a shard (the block-diagonal layout) too."""
    from pagedllm.lora import layers
    from pagedllm.lora.layers import LoRALinear, LoRAStepState
    gen = torch.Generator().manual_seed(seed)
    sizes, num_tokens, num_loras, rank = (32, 16, 16), 37, 3, 8
    base = torch.nn.Linear(64, sum(sizes), bias=False)
    base.shard_sizes = sizes
    x = torch.randn(num_tokens, 64, generator=gen)
    shards = [[(a, torch.randn(n, rank, generator=gen)) for n in sizes]
              for a in (torch.randn(rank, 64, generator=gen) / 8 for _ in range(num_loras))]
    slots = request_slots(num_tokens, num_loras, gen, False)
    order, sorted_slots = slot_metadata(slots, num_loras)
    meta = torch.full((3, len(order)), -1, dtype=torch.int32)
    meta[0, :num_tokens], meta[1], meta[2] = slots, order, sorted_slots
    state = LoRAStepState(meta, sorted(set(slots[slots >= 0].tolist())))
    ref = _reference(x, base(x).detach(), shards, slots, sizes)
    kernel, layers.LORA_KERNEL, LoRALinear.kernels_on_cpu = layers.LORA_KERNEL, path, True
    try:
        err = 0.0
        for shared in (True, False):
            layer = LoRALinear(base, num_loras, rank, state, shared_a=shared)
            assert layer.lora_a.shape[1] == (1 if shared else len(sizes)) * rank and (layer.wide is None) == (
                path != "wide")
            for s, per_shard in enumerate(shards):
                layer.set_slot(s, dict(enumerate(per_shard)))
            with torch.no_grad():
                got = layer(x).double()
            delta = (ref - x.double() @ base.weight.double().t()).norm(dim=1).clamp_min(1e-30)
            err = max(err, ((got - ref).norm(dim=1) / delta)[slots >= 0].max().item())
    finally:
        layers.LORA_KERNEL, LoRALinear.kernels_on_cpu = kernel, False
    assert err <= TOLERANCE[torch.float32], f"relative error {err:.2e}"
    return err


def interpreter_cases():
    """Through add_lora (the fused kernel for ranks <= 64, the split path above), then each path by name."""
    # not bfloat16: the interpreter's tl.dot multiplies bfloat16 bit patterns as integers (Triton 3.9); float16
    # runs the same half-precision code path, and the GPU tests cover bfloat16
    for i, dtype in enumerate([torch.float32, torch.float16]):
        yield f"qkv-r8-{dtype}", lambda d=dtype, i=i: check_lora(37, 64, (32, 16, 16), 8, 3, d, "cpu", seed=i)
        yield f"decode-r16-{dtype}", lambda d=dtype, i=i: check_lora(20, 48, (40,), 16, 4, d, "cpu", i, True)
    yield "gate_up-r64-k300", lambda: check_lora(19, 300, (72, 72), 64, 2, torch.float32, "cpu", seed=7)
    yield "rank20-odd-shards", lambda: check_lora(9, 33, (24, 8, 8), 20, 2, torch.float32, "cpu", seed=8)
    yield "k600-rank80-splits", lambda: check_lora(11, 600, (40, 24), 80, 2, torch.float32, "cpu", seed=10)
    yield "all-base", lambda: check_lora(5, 32, (16,), 8, 0, torch.float32, "cpu", seed=9)
    yield from fused_cases()
    yield "split-qkv-r16", lambda: check_lora(37, 64, (32, 16, 16), 16, 3, torch.float32, "cpu", 11, kernel=split)
    yield "split-packed", lambda: check_lora(37, 64, (32, 16, 16), 16, 3, torch.float32, "cpu", 12, kernel=split,
                                             packed=True)
    yield "wide-gemm-qkv-r16", lambda: check_lora(37, 64, (32, 16, 16), 16, 3, torch.float32, "cpu", 13,
                                                  kernel=wide_gemm)
    yield "wide-gemm-decode-8loras", lambda: check_lora(16, 64, (48,), 8, 8, torch.float32, "cpu", 14, True,
                                                        kernel=wide_gemm)
    for path in ("fused", "split", "wide"):
        yield f"shared-a-layer-{path}", lambda p=path: check_shared_a_layer(p)


def fused_cases():
    """The fused kernel alone, float32: decode steps of 1..16 tokens over 8 adapters, runs packed end to end
    (several adapters a tile), K not a multiple of BLOCK_K, ranks 4..64, other block sizes; about a quarter of
    the rows base."""
    from pagedllm.lora.fused import FusedConfig, lora_fused
    f32 = torch.float32
    for t in (1, 3, 16):
        yield f"fused-decode-t{t}-8loras", lambda t=t: check_lora(t, 64, (48, 16), 16, 8, f32, "cpu", 20 + t, True,
                                                                   kernel=lora_fused)
    yield "fused-decode-t16-packed", lambda: check_lora(16, 64, (48, 16), 16, 8, f32, "cpu", 36, True,
                                                        kernel=lora_fused, packed=True)
    yield "fused-r4-k100", lambda: check_lora(23, 100, (40,), 4, 3, f32, "cpu", seed=30, kernel=lora_fused)
    small = functools.partial(lora_fused, config=FusedConfig(block_m=32, block_n=16, block_k=32, num_stages=2))
    yield "fused-m32-n16-k32-r32", lambda: check_lora(70, 96, (40, 24, 24), 32, 5, f32, "cpu", 31, kernel=small)
    yield "fused-r64-decode-t40", lambda: check_lora(40, 80, (64,), 64, 6, f32, "cpu", 32, True, kernel=lora_fused)
    # a large step's path: programs of several column tiles (all of a shard's; 2 of 3, the last one partial)
    for programs, name in ((1, "all"), (16, "some")):
        wide = functools.partial(lora_fused, config=FusedConfig(block_n=16, block_k=32), programs=programs)
        yield f"fused-col-tiles-{name}", lambda k=wide: check_lora(50, 64, (48, 40, 16), 8, 3, f32, "cpu", 33, kernel=k)


if __name__ == "__main__":
    from fused_cases import _patch_interpreter
    _patch_interpreter()
    for name, check in interpreter_cases():
        print(f"ok {name} rel_err={check():.1e}", flush=True)
