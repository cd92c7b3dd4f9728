"""LoRA on a linear layer: y = base(x) + (x @ A^T) @ B^T for the tokens of rows whose request has an adapter.

Adapters sit in `max_loras` slots of stacked tensors, zero-padded to max_lora_rank (exact: padded columns add
products with zero). A fused layer's shards are one block-diagonal product: A stacks each shard's (R, in) on
the rank axis, B puts each shard's (out_i, R) in its rows and its rank columns (zeros elsewhere add nothing).
A module the HF model itself holds fused (Phi-3's qkv_proj, gate_up_proj: `shared_a`) has one A for all its
shards: the layer holds it once, one rank block whose B columns span every shard's rows, so the kernels see a
layer of one shard and compute x A^T once a token, not once a shard.
The scale is folded into B at load. Each step the runner sets LoRAStepState (lora/manager.py): every token's
slot (-1: none) and the tokens in slot order, in one persistent device buffer that CUDA graphs read, and the
slots present in the step as a host list. On CUDA two Triton launches (lora/kernels.py: shrink, expand) serve
every slot at once and leave base rows untouched; the host list only says whether any token has an adapter:
the runner replays a graph captured with the launches (every slot present) when one does, else one without.
On CPU a torch loop over the step's slots, the reference. Neither reads a device value (no sync).
Tensor parallelism: a rank's slots hold its part of each adapter (peft_loader.py), so the kernels see the
shapes a TP=1 model of the rank's sizes gives them. Around a row-parallel base (o_proj, down_proj) the LoRA
product, partial like the base's (A holds the rank's input columns), is added before the one all-reduce, and
the bias after it: each added once.
"""
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from pagedllm.distributed.layers import RowParallelLinear
from pagedllm.lazy_kernel import lazy_kernel
from pagedllm.lora.peft_loader import TARGETS

add_lora = lazy_kernel(globals(), "pagedllm.lora.ops", "add_lora")   # Triton, CUDA only
lora_expand = lazy_kernel(globals(), "pagedllm.lora.kernels", "lora_expand")

# Which kernels serve the layers on CUDA, for the process:
#   wide   every slot's A rows appended to the base weight: the base GEMM also gives each slot's x A^T, and only
#          the expand is left (LoRALinear._forward_wide). H200, W1 with 8 rank-16 adapters: 0.55 ms of LoRA a
#          step against fused's 1.0; 0.885-0.903 of base throughput against fused's 0.82-0.85 (RESULTS.md,
#          2026-12-05). Every step reads and multiplies all slots' A rows, used or not.
#   fused  one launch a layer over the step's adapters only (lora/ops.py); split: shrink then expand (ops.py).
#   auto   (the default) wide in a layer whose slots' A rows add at most WIDE_MAX_EXTRA of its base rows (the
#          measured cases: 8 or 16 slots of rank 16 on Qwen3-0.6B, up to a quarter), else fused.
# Read at import; ops.add_lora reads LORA_KERNEL at each call, a layer being built reads it to choose wide
# (benchmarks/lora_throughput.py switches it between engines).
KERNEL_ENV = "PAGEDLLM_LORA_KERNEL"
KERNELS = ("auto", "fused", "split", "wide")
LORA_KERNEL = os.environ.get(KERNEL_ENV, "auto")
if LORA_KERNEL not in KERNELS:
    raise ValueError(f"{KERNEL_ENV} must be one of {KERNELS}, got {LORA_KERNEL!r}")
WIDE_MAX_EXTRA = 0.25


def uses_wide(out_features: int, extra_rows: int) -> bool:
    return LORA_KERNEL == "wide" or (LORA_KERNEL == "auto" and extra_rows <= WIDE_MAX_EXTRA * out_features)


# The kernels' tile rows (lora/kernels.py's BLOCK_M, lora/fused.py's default block_m): each adapter's run of
# sorted tokens starts at a multiple of it, so a tile holds one adapter and a program one K loop. Runs packed
# end to end put two adapters in most tiles of a decode step (~29 tokens an adapter on W1), whose K loops ran one
# after the other: H200, W1's LoRA kernels 12.6 -> 9.7 us a call in the engine, 1.504 -> 1.085 ms a 232-token
# step (benchmarks/lora_kernels.py --layers-apart, --packed for the old layout).
SEGMENT = 16


def sorted_len(num_tokens: int, num_slots: int) -> int:
    """Entries of a step's sorted token list: its tokens, each slot's run padded to whole SEGMENTs."""
    return num_tokens + num_slots * (SEGMENT - 1)


def sort_by_slot(token_slots: np.ndarray, num_slots: int, order: np.ndarray, sorted_slots: np.ndarray):
    """Fills order and sorted_slots (sorted_len entries each): the tokens with a slot, by slot (stable), each
    slot's run from a multiple of SEGMENT; the gaps and the tail are slot -1 (token 0), which no kernel reads."""
    tokens = np.flatnonzero(token_slots >= 0)
    tokens = tokens[np.argsort(token_slots[tokens], kind="stable")]
    slots = token_slots[tokens]
    counts = np.bincount(slots, minlength=num_slots)
    padded = -(-counts // SEGMENT) * SEGMENT
    run_at = np.cumsum(counts) - counts                   # a slot's first token among the sorted tokens
    place = np.cumsum(padded) - padded                    # ... and its first entry in the padded list
    at = place[slots] + np.arange(len(tokens)) - run_at[slots]
    order.fill(0)
    sorted_slots.fill(-1)
    order[at], sorted_slots[at] = tokens, slots


@dataclass
class LoRAStepState:
    """Shared by every LoRALinear of a model; set by the runner before each forward. Rows of `meta` (3, capacity)
    int32 on the device: each token's slot (-1: a base token or padding), the step's first T columns; then the
    token indices sorted by slot and their slots (sort_by_slot), its first sorted_len(T, max_loras) columns."""
    meta: torch.Tensor
    active_slots: list[int] = field(default_factory=list)

    @property
    def token_slots(self) -> torch.Tensor:
        return self.meta[0]


class LoRALinear(nn.Module):
    kernels_on_cpu = False   # tests: the Triton kernels on CPU tensors, under TRITON_INTERPRET=1

    def __init__(self, base: nn.Module, max_loras: int, max_rank: int, state: LoRAStepState,
                 lora_dtype: torch.dtype | None = None, shared_a: bool = False):
        """lora_dtype: the slots' (vLLM's --lora-dtype); None: the base weight's (bfloat16 under 8-bit weights).
        shared_a: every adapter has one A for all the base's shards (the loader checks it), held once."""
        super().__init__()
        self.base = base
        self.state = state
        # a row-parallel base: its partial product and this layer's join before its all-reduce (`forward`)
        self.row_parallel = isinstance(base, RowParallelLinear)
        self.shard_sizes = tuple(getattr(base, "shard_sizes", (base.out_features,)))
        self.in_features, self.out_features = base.in_features, base.out_features
        self.shared_a = shared_a
        lora_shards = (self.out_features,) if shared_a else self.shard_sizes   # a rank block each
        self.max_rank, self.max_shard = max_rank, max(lora_shards)
        weight = base.weight
        dtype = weight.dtype if weight.dtype.is_floating_point and weight.element_size() > 1 else torch.bfloat16
        dtype = lora_dtype or dtype
        n = len(lora_shards)
        self.wide = None   # wide: (out + max_loras * n * R, in), the base weight's rows, then each slot's A rows
        self.wide_bias = None
        if (uses_wide(self.out_features, max_loras * n * max_rank) and (weight.is_cuda or self.kernels_on_cpu)
                and weight.dtype == dtype):
            self._widen(max_loras, n * max_rank)
        else:
            self.register_buffer("lora_a", torch.zeros(max_loras, n * max_rank, self.in_features, dtype=dtype,
                                                       device=weight.device), persistent=False)
        self.register_buffer("lora_b", torch.zeros(max_loras, self.out_features, n * max_rank, dtype=dtype,
                                                   device=weight.device), persistent=False)
        bounds = [sum(lora_shards[:i]) for i in range(n + 1)]   # the shards' first output columns, then out
        self.register_buffer("shard_bounds", torch.tensor(bounds, dtype=torch.int32, device=weight.device),
                             persistent=False)

    def _widen(self, max_loras: int, n_rank: int):
        """Moves the base weight into the first rows of one (out + max_loras n_rank, in) tensor whose other rows are
        the slots' A (lora_a is their view): the base layer reads its rows alone, a step with adapters reads all."""
        weight, out = self.base.weight, self.out_features
        wide = torch.zeros(out + max_loras * n_rank, self.in_features, dtype=weight.dtype, device=weight.device)
        wide[:out].copy_(weight.detach())
        self.base.weight = nn.Parameter(wide[:out], requires_grad=False)
        self.wide = wide
        self.register_buffer("lora_a", wide[out:].view(max_loras, n_rank, self.in_features), persistent=False)
        if self.base.bias is not None and not self.row_parallel:   # a row-parallel bias is added after the reduce
            self.wide_bias = torch.cat([self.base.bias.detach(), wide.new_zeros(max_loras * n_rank)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.row_parallel:
            return self._forward(x, self.base)
        base = self.base
        y = base.tp.all_reduce(self._forward(x, lambda x: torch.nn.functional.linear(x, base.weight)).contiguous())
        return y if base.bias is None else y + base.bias

    def _forward(self, x: torch.Tensor, base) -> torch.Tensor:
        if self.wide is not None and self.state.active_slots:
            return self._forward_wide(x)
        y = base(x)
        if not self.state.active_slots:
            return y
        meta = self.state.meta
        if x.is_cuda or self.kernels_on_cpu:
            n = sorted_len(x.shape[0], self.lora_a.shape[0])
            return add_lora(y, x, self.lora_a, self.lora_b, meta[1, :n], meta[2, :n], self.shard_bounds,
                            self.max_shard, self.max_rank)
        slots = meta[0, :x.shape[0]]
        xl = x.to(self.lora_a.dtype)
        for s in self.state.active_slots:
            delta = (xl @ self.lora_a[s].t()) @ self.lora_b[s].t()          # (T, out)
            y = y + delta.to(y.dtype) * (slots == s).unsqueeze(1).to(y.dtype)
        return y

    def _forward_wide(self, x: torch.Tensor) -> torch.Tensor:
        """One GEMM for the base output and x A^T of every slot beside it; the expand adds each adapter row's own
        slot's product times B into the base columns. Returns a view with a row stride of the wide output's
        (the kernels after the four layers take row strides)."""
        out, n_rank = self.out_features, self.lora_a.shape[1]
        wide = torch.nn.functional.linear(x, self.wide, self.wide_bias)
        meta = self.state.meta
        n = sorted_len(x.shape[0], self.lora_a.shape[0])
        return lora_expand(wide[:, :out], wide[:, out:].unsqueeze(0), self.lora_b, meta[1, :n], meta[2, :n],
                           self.shard_bounds, self.max_shard, self.max_rank, slot_stride=n_rank)

    def set_slot(self, slot: int, shards: dict[int, tuple[torch.Tensor, torch.Tensor]] | None):
        """Writes an adapter's shards (A (r, in), B*scale (out_i, r)) into a slot; None or missing shards: zeros.
        shared_a: the shards' A are one, written in the one rank block each time."""
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        R = self.max_rank
        for shard, (a, b) in (shards or {}).items():
            r, row = a.shape[0], sum(self.shard_sizes[:shard])
            col = 0 if self.shared_a else shard * R   # the shard's rank block
            self.lora_a[slot, col:col + r].copy_(a, non_blocking=True)
            self.lora_b[slot, row:row + b.shape[0], col:col + r].copy_(b, non_blocking=True)


# the decoder linears LoRA may target, each with the HF modules fused in it, in shard order: TARGETS read the
# other way (one table, so a target added there is wrapped here)
MODULES = {ours: tuple(hf for hf, (m, _) in TARGETS.items() if m == ours) for ours, _ in TARGETS.values()}


def selected_modules(target_modules: list[str] | None) -> tuple[str, ...]:
    """vLLM's --lora-target-modules: the linears whose name, or a module fused in it, is listed (q_proj selects
    qkv_proj whole, as vLLM's packed modules); None: all."""
    if target_modules is None:
        return tuple(MODULES)
    return tuple(m for m, fused in MODULES.items() if {m.rsplit(".", 1)[1], *fused} & set(target_modules))


def wrap_lora_layers(model: nn.Module, max_loras: int, max_rank: int, lora_dtype: torch.dtype | None = None,
                     target_modules: list[str] | None = None) -> tuple[LoRAStepState, dict[str, LoRALinear]]:
    """Replaces each decoder linear LoRA may target (qkv_proj, o_proj, gate_up_proj, down_proj; those of
    target_modules) by a LoRALinear around it; returns the shared step state (its buffer empty: the manager sizes
    it) and the wrappers by name."""
    device = next(model.parameters()).device
    state, wrapped = LoRAStepState(torch.full((3, 0), -1, dtype=torch.int32, device=device)), {}
    targets = selected_modules(target_modules)
    hf_fused = getattr(model, "hf_fused_modules", ())
    for i, _ in enumerate(model.model.layers):
        for t in targets:
            name = f"model.layers.{i}.{t}"
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            wrapped[name] = LoRALinear(getattr(parent, leaf), max_loras, max_rank, state, lora_dtype,
                                       shared_a=leaf in hf_fused)
            setattr(parent, leaf, wrapped[name])
    return state, wrapped
