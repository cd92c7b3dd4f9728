"""Mixture of experts (Qwen3-MoE, Mixtral): a router picks top_k of E SwiGLU experts for each token, whose
outputs are summed weighted by the router's probabilities.

Weights, as transformers 5 holds them (and, so, as its fused checkpoints name them):
    gate.weight                (E, C)       the router
    experts.gate_up_proj       (E, 2I, C)   rows: gate | up, one (2I, C) matrix an expert
    experts.down_proj          (E, C, I)
Hub checkpoints store each expert's linears apart (experts.M.gate_proj.weight, ...): load_expert_shard copies
one into its expert's rows.

Tensor parallelism (vLLM's default, no expert parallelism): every rank holds every expert and the whole router,
and I/N of each expert's intermediate dimension (gate and up rows, down columns), so SiLU(gate) * up stays local
and the block's output is a partial sum, all-reduced once, as a row-parallel layer's. The loader hands in each
per-expert tensor already cut (distributed/layers.py checkpoint_slice); a stacked tensor comes whole and
load_stacked takes this rank's share of it.

Compute: the T*K (token, expert) pairs sorted by expert, so that each expert's tokens are contiguous rows, one
GEMM an expert over them, then the pairs put back in token order and summed. On CUDA in bf16 (sm90/sm100) the GEMMs
are two torch._grouped_mm calls over all experts with device-side offsets: a fixed set of kernels for a given
T, which a CUDA graph can capture. Elsewhere (CPU, float32/fp16 on CUDA) a loop over the experts reads each
one's row count on the host: correct, but no graph can hold it (Experts.graph_safe says which).
"""
import functools
import re

import torch
from torch import nn
from torch.nn import functional as F

from pagedllm.distributed.parallel_state import TPGroup

# model.layers.N.mlp.experts.M.{gate,up,down}_proj.weight: one expert's linear in a Hub checkpoint
_EXPERT_SHARD = re.compile(r"^(?P<experts>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>(gate|up|down)_proj)\.weight$")


def route(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits (T, E) -> (weights (T, K) float32, expert ids (T, K)): softmax over all E experts in float32,
    the top_k largest, rescaled to sum to 1 where renormalize (Qwen3-MoE's norm_topk_prob; Mixtral always)."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, tp: TPGroup = TPGroup()):
        """intermediate_size: this rank's share of each expert's (I/N, tp: the group it is a share of)."""
        super().__init__()
        self.num_experts, self.intermediate_size, self.tp = num_experts, intermediate_size, tp
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        # 0..E-1 (int64, as the router's ids), the grouped path's searchsorted keys: made once, so a captured
        # graph reads a static tensor and an eager step launches no arange
        self.register_buffer("expert_ids", torch.arange(num_experts), persistent=False)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x (T, C), the router's weights and ids (T, K) -> sum over k of weights[:, k] * expert ids[:, k] (x)."""
        num_tokens, top_k = ids.shape
        flat = ids.flatten()                                    # (T*K,) pair p = token p // K, its k-th expert
        order = torch.argsort(flat, stable=True)                # pairs by expert
        rows = x.index_select(0, order // top_k)                # (T*K, C): each pair's token, grouped by expert
        run = self._grouped if self.uses_grouped_mm(x) else self._looped
        out_sorted = run(rows, flat.index_select(0, order))     # (T*K, C)
        out = torch.empty_like(out_sorted).index_copy_(0, order, out_sorted).view(num_tokens, top_k, -1)
        return (out.float() * weights.unsqueeze(-1)).sum(dim=1).to(x.dtype)

    def uses_grouped_mm(self, x: torch.Tensor) -> bool:
        return x.is_cuda and self.graph_safe(x.device)

    def graph_safe(self, device: torch.device) -> bool:
        """The grouped path: CUDA, bf16 weights, rows 16-byte aligned, an sm90 or sm100 device: where torch runs
        _grouped_mm's CUTLASS kernels; elsewhere its fallback copies the offsets to the host, as the loop does."""
        return (device.type == "cuda" and hasattr(torch, "_grouped_mm")
                and self.down_proj.dtype == torch.bfloat16
                and _has_grouped_gemm_kernels(device)
                and self.down_proj.shape[1] % 8 == 0 and self.intermediate_size % 8 == 0)

    def _grouped(self, rows: torch.Tensor, sorted_ids: torch.Tensor) -> torch.Tensor:
        """Two grouped GEMMs; offs[e] = the end row of expert e's run (experts with no rows: an empty run)."""
        offs = torch.searchsorted(sorted_ids, self.expert_ids, right=True, out_int32=True)
        gate_up = torch._grouped_mm(rows, self.gate_up_proj.transpose(-2, -1), offs=offs)    # (T*K, 2I)
        return torch._grouped_mm(_silu_and_mul(gate_up), self.down_proj.transpose(-2, -1), offs=offs)

    def _looped(self, rows: torch.Tensor, sorted_ids: torch.Tensor) -> torch.Tensor:
        """One pair of GEMMs an expert that has rows (the counts are read on the host)."""
        counts = torch.bincount(sorted_ids, minlength=self.num_experts).tolist()
        out = torch.empty_like(rows)
        start = 0
        for e, n in enumerate(counts):
            if n:
                part = rows[start:start + n]
                out[start:start + n] = F.linear(_silu_and_mul(F.linear(part, self.gate_up_proj[e])),
                                                self.down_proj[e])
            start += n
        return out

    @torch.no_grad()
    def load_expert_shard(self, expert: int, proj: str, tensor: torch.Tensor) -> None:
        """One expert's gate_proj (I, C), up_proj (I, C) or down_proj (C, I) from a per-expert checkpoint."""
        if proj == "down_proj":
            dest = self.down_proj[expert]
        else:
            inter = self.intermediate_size
            dest = self.gate_up_proj[expert].narrow(0, 0 if proj == "gate_proj" else inter, inter)
        if dest.shape != tensor.shape:
            raise ValueError(f"expert {expert}'s {proj} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}")
        dest.copy_(tensor)

    @torch.no_grad()
    def load_stacked(self, attr: str, tensor: torch.Tensor) -> None:
        """A whole stacked checkpoint tensor, gate_up_proj (E, 2I, C) or down_proj (E, C, I): this rank's share."""
        inter, rank = self.intermediate_size, self.tp.rank
        full = inter * self.tp.size
        if attr == "down_proj":
            parts = [(2, rank * inter)]
        else:   # this rank's rows of the gate half, then of the up half
            parts = [(1, rank * inter), (1, full + rank * inter)]
        dest = getattr(self, attr)
        expected = list(dest.shape)
        expected[parts[0][0]] = full * len(parts)
        if list(tensor.shape) != expected:
            raise ValueError(f"stacked experts {attr} has shape {tuple(tensor.shape)}, expected {tuple(expected)}")
        dest.copy_(torch.cat([tensor.narrow(dim, start, inter) for dim, start in parts], dim=parts[0][0]))

    def checkpoint_shard_names(self, prefix: str) -> dict[str, list[str]]:
        """Our parameter -> the per-expert names that fill it (prefix: this module's name)."""
        return {"gate_up_proj": [f"{prefix}.{e}.{p}.weight" for e in range(self.num_experts)
                                 for p in ("gate_proj", "up_proj")],
                "down_proj": [f"{prefix}.{e}.down_proj.weight" for e in range(self.num_experts)]}


def _has_grouped_gemm_kernels(device: torch.device) -> bool:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability_major(index) in (9, 10)


@functools.cache   # a device's capability never changes, and each MoE layer asks for it every step
def _capability_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def _silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


class SparseMoeBlock(nn.Module):
    """The MLP of a sparse layer: router, top-k, experts."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int, renormalize: bool,
                 tp: TPGroup = TPGroup()):
        """intermediate_size: this rank's share of each expert's; the router is whole on every rank."""
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok ({top_k}) must be in 1..num_experts ({num_experts})")
        self.top_k, self.renormalize, self.tp = top_k, renormalize, tp
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = Experts(num_experts, hidden_size, intermediate_size, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(self.gate(x), self.top_k, self.renormalize)    # (T, K), (T, K): the same on each rank
        return self.tp.all_reduce(self.experts(x, weights, ids))            # (T, C): partial sums over I

    def active_fraction(self) -> float:
        """The share of the experts' weights a token multiplies through."""
        return self.top_k / self.experts.num_experts


def expert_shard(name: str) -> tuple[str, int, str] | None:
    """'m.layers.0.mlp.experts.3.up_proj.weight' -> ('m.layers.0.mlp.experts', 3, 'up_proj'); else None."""
    match = _EXPERT_SHARD.match(name)
    return None if match is None else (match["experts"], int(match["expert"]), match["proj"])


def cuda_graph_blocker(model: nn.Module, device: torch.device) -> str | None:
    """Why no CUDA graph can hold this model's steps on `device` (experts on the host-synced loop), else None."""
    for module in model.modules():
        if isinstance(module, Experts) and not module.graph_safe(device):
            return (f"its mixture-of-experts layers loop over the experts on this device and dtype "
                    f"({module.down_proj.dtype}; the grouped GEMMs need bf16 on an sm90 or sm100 GPU)")
    return None
