"""Tensor-parallel layers and which slice of each checkpoint tensor a rank holds.

    column-parallel (qkv_proj, gate_up_proj): each rank a block of output rows of every fused shard
        q: its Hq/N heads; k, v: its Hkv/N heads, or (Hkv < N) the one KV head its q heads attend to,
        replicated on N/Hkv ranks; gate and up: the same I/N columns of both (SiLU(gate) * up stays local)
    row-parallel (o_proj, down_proj): each rank the input columns of its heads / its I/N; partial sums
        all-reduced, the bias (whole on every rank) added once after
    experts (mixture of experts, layers/moe.py): every expert on every rank, each one's gate and up its I/N
        rows, its down those I/N columns (I: moe_intermediate_size, Mixtral's intermediate_size); the router
        whole; the block's output all-reduced once (a stacked-experts checkpoint tensor is read whole, then cut)
    vocab-parallel (embed_tokens, lm_head): each rank ceil(V/N) rows (the last one zero-padded); the
        embedding masks ids outside its rows and all-reduces, the LM head's logits are all-gathered
A rank's parameters are built with these local shapes, and the loader reads only its slice of each
checkpoint tensor (safetensors get_slice), so no rank holds a whole tensor it does not need.
"""
import math
import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from pagedllm.distributed.parallel_state import TPGroup


@dataclass(frozen=True)
class HeadShard:
    num_heads: int      # this rank's query heads
    num_kv_heads: int   # this rank's KV heads (1 when replicated)
    q_start: int        # its first query head
    kv_start: int       # its first KV head


def head_shard(num_heads: int, num_kv_heads: int, tp: TPGroup) -> HeadShard:
    n, r = tp.size, tp.rank
    if num_heads % n:
        raise ValueError(f"num_attention_heads ({num_heads}) must be divisible by tensor_parallel_size ({n})")
    if num_kv_heads >= n:
        if num_kv_heads % n:
            raise ValueError(f"num_key_value_heads ({num_kv_heads}) must be divisible by tensor_parallel_size "
                             f"({n}) when it is larger")
        local_kv, kv_start = num_kv_heads // n, r * (num_kv_heads // n)
    else:   # fewer KV heads than ranks: rank r's query heads all attend to KV head r * Hkv / N
        if n % num_kv_heads:
            raise ValueError(f"tensor_parallel_size ({n}) must be a multiple of num_key_value_heads "
                             f"({num_kv_heads}) when it is larger")
        local_kv, kv_start = 1, r * num_kv_heads // n
    return HeadShard(num_heads // n, local_kv, r * (num_heads // n), kv_start)


def split_size(total: int, tp: TPGroup, what: str) -> int:
    if total % tp.size:
        raise ValueError(f"{what} ({total}) must be divisible by tensor_parallel_size ({tp.size})")
    return total // tp.size


def vocab_rows(vocab_size: int, tp: TPGroup) -> tuple[int, int, int]:
    """(rows per rank, this rank's first id, its last id + 1): ceil(V/N) rows, the last rank's partly padding."""
    per = -(-vocab_size // tp.size)
    start = min(tp.rank * per, vocab_size)
    return per, start, min(start + per, vocab_size)


def checkpoint_slice(name: str, shape, config, head_dim: int, tp: TPGroup,
                     block: tuple[int, int] | None = None) -> tuple[int, int, int] | None:
    """(dim, start, stop) of HF tensor `name` (of `shape`) that this rank loads; None: the whole tensor (norms,
    biases of row-parallel layers, per-head q/k norms, scalar scales).

    FP8 checkpoints (layers/quantization): a column-parallel layer's per-channel `weight_scale` is cut as its
    rows; a row-parallel layer keeps every output channel, so its per-channel scales are whole, as are per-tensor
    weight scales and static `input_scale`s (of the whole row: each rank's slice of it has the same scale).
    Block scales (`weight_scale_inv`, `block` = quantization_config.weight_block_size) are cut by block: the
    rank's rows / columns must be whole blocks (the last may be the tensor's partial one), else ValueError."""
    parts = name.split(".")
    leaf, attr = (parts[-2], parts[-1]) if len(parts) >= 2 else ("", name)
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        _, start, stop = vocab_rows(config.vocab_size, tp)
        return 0, start, stop
    expert = _EXPERT_LINEAR.search(name)
    # (dim of the weight, start, stop, whole extent) or None
    cut = expert_cut(expert["proj"], config, tp) if expert else layer_cut(leaf, config, head_dim, tp)
    if cut is None:
        return None
    dim, start, stop, extent = cut
    if attr == "weight":
        return dim, start, stop
    if attr == "bias":
        return (0, start, stop) if dim == 0 else None
    if attr == "weight_scale":   # per tensor: one value; per channel: (N,) or (N, 1), cut only by rows
        return (0, start, stop) if dim == 0 and math.prod(shape) > 1 else None
    if attr == "weight_scale_inv" and block is not None:
        size = block[dim]
        if start % size or (stop % size and stop != extent):
            raise ValueError(f"checkpoint tensor {name}: with tensor_parallel_size {tp.size}, rank {tp.rank} holds "
                             f"{'rows' if dim == 0 else 'columns'} {start}:{stop} of {extent}, not whole blocks of "
                             f"quantization_config.weight_block_size {list(block)}")
        return dim, start // size, -(-stop // size)
    return None   # input_scale, output_scale (KV), ...: scalars of the whole layer


def layer_cut(leaf: str, config, head_dim: int, tp: TPGroup) -> tuple[int, int, int, int] | None:
    """A linear's split: (0: column-parallel rows / 1: row-parallel columns, start, stop, whole extent)."""
    if leaf in ("q_proj", "k_proj", "v_proj", "o_proj"):
        num_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        heads = head_shard(config.num_attention_heads, num_kv, tp)
        if leaf in ("q_proj", "o_proj"):
            start, stop = heads.q_start * head_dim, (heads.q_start + heads.num_heads) * head_dim
            return int(leaf == "o_proj"), start, stop, config.num_attention_heads * head_dim
        first, count = heads.kv_start, heads.num_kv_heads
        return 0, first * head_dim, (first + count) * head_dim, num_kv * head_dim
    if leaf in ("gate_proj", "up_proj", "down_proj"):
        per = split_size(config.intermediate_size, tp, "intermediate_size")
        return int(leaf == "down_proj"), tp.rank * per, (tp.rank + 1) * per, config.intermediate_size
    return None


# one expert's linear in a Hub checkpoint: Qwen-MoE's names, Mixtral's (w1 gate, w3 up, w2 down)
_EXPERT_LINEAR = re.compile(r"\.experts\.\d+\.(?P<proj>gate_proj|up_proj|down_proj|w1|w2|w3)\.")


def expert_cut(proj: str, config, tp: TPGroup) -> tuple[int, int, int, int]:
    """An expert linear's split, as layer_cut's: gate / up (w1 / w3) rows, down (w2) columns, of the experts'
    intermediate size (moe_intermediate_size; Mixtral's experts are intermediate_size wide)."""
    field = "moe_intermediate_size" if getattr(config, "moe_intermediate_size", None) else "intermediate_size"
    total = getattr(config, field)
    per = split_size(total, tp, field)
    return int(proj in ("down_proj", "w2")), tp.rank * per, (tp.rank + 1) * per, total


def take_slice(tensor, where: tuple[int, int, int] | None):
    """A safetensors slice (get_slice) or a tensor, cut to `where`; only those bytes are read."""
    if where is None:
        return tensor[:]
    dim, start, stop = where
    return tensor[start:stop] if dim == 0 else tensor[:, start:stop]


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local @ W_local^T) + b: x is this rank's columns (its heads, its I/N)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup):
        super().__init__()
        self.tp = tp
        self.in_features, self.out_features = in_features, out_features   # this rank's inputs, all outputs
        self.shard_sizes = (out_features,)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.tp.all_reduce(F.linear(x, self.weight))
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows [start, stop) of the table; other ids give zeros here and their rank's row after the all-reduce."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup):
        super().__init__()
        self.tp = tp
        per, self.start, self.stop = vocab_rows(vocab_size, tp)
        self.weight = nn.Parameter(torch.zeros(per, hidden_size))   # padding rows stay zero

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        outside = (input_ids < self.start) | (input_ids >= self.stop)
        local = (input_ids - self.start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return self.tp.all_reduce(out)
