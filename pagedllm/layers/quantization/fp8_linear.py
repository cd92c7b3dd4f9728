"""Fp8Linear: an nn.Linear whose weight is float8_e4m3fn with one float32 scale per output row, and how
checkpoint tensors (float, fp8 with per-tensor / per-channel / per-block scales) land in it.

Parameters: weight (N, K) fp8, weight_scale (N,) float32, bias (N,) in the model dtype (optional),
input_scale () float32 (static activations only). A fused layer (qkv_proj, gate_up_proj) keeps `shard_sizes`:
checkpoint shard i fills rows sum(sizes[:i]) .. + sizes[i] of weight, weight_scale and bias.

Tensor parallelism (distributed/layers.py): a column-parallel layer is this class with the rank's rows; a
row-parallel one (`tp` given: o_proj, down_proj) holds the rank's input columns, all-reduces its partial sums and
adds the (whole) bias once after. Either way the rank's own input is quantized per token (a row-parallel rank:
its slice of each row), as vLLM does. The loader hands in the rank's slices (checkpoint_slice); a float weight is
quantized per output channel over the slice the rank loaded, so a row-parallel layer's weight scales are the
amax of the rank's columns, one set per rank: vLLM's way too (each rank quantizes the weight it loaded).
"""
import torch
from torch import nn

from pagedllm.distributed.layers import RowParallelLinear
from pagedllm.distributed.parallel_state import TPGroup
from pagedllm.layers.quantization.fp8 import FP8, dequantize_blocks, fp8_linear, quantize_per_channel, scaled_mm
from pagedllm.layers.quantization.fp8_config import FP8_BLOCK, FLOAT, Fp8Config


class Fp8Linear(nn.Module):
    def __init__(self, in_features: int, shard_sizes: tuple[int, ...], bias: bool, config: Fp8Config,
                 tp: TPGroup | None = None):
        """tp: row-parallel over this group (in_features: the rank's columns); None: not row-parallel."""
        super().__init__()
        self.tp = tp if tp is not None and tp.enabled else None
        out_features = sum(shard_sizes)
        self.in_features, self.out_features, self.shard_sizes = in_features, out_features, shard_sizes
        self.config = config
        self.out_dtype = torch.get_default_dtype()   # the model dtype: built under the loader's default dtype
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(out_features, dtype=torch.float32), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        # static: the max of the shards' scales (q/k/v share one input); 0 until loaded
        self.input_scale = (nn.Parameter(torch.zeros((), dtype=torch.float32), requires_grad=False)
                            if config.static_input else None)
        self._pending: dict[int, dict[str, torch.Tensor]] = {}   # block format: a shard's weight or scales

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x in the model dtype, or (fp8 rows, (M, 1) scales) from a fused norm or activation (fuse.py)."""
        bias = self.bias if self.tp is None else None   # row-parallel: added once, after the all-reduce
        if isinstance(x, tuple):
            out = scaled_mm(*x, self.weight, self.weight_scale, bias, self.out_dtype)
        else:
            out = fp8_linear(x, self.weight, self.weight_scale, bias, self.input_scale)
        if self.tp is None:
            return out
        out = self.tp.all_reduce(out)
        return out if self.bias is None else out + self.bias

    def checkpoint_attrs(self) -> tuple[str, ...]:
        return self.config.checkpoint_attrs() + (("bias",) if self.bias is not None else ())

    @torch.no_grad()
    def load_shard(self, name: str, attr: str, tensor: torch.Tensor, shard: int) -> None:
        """Checkpoint tensor `name` (attr of shard `shard`) into this layer's rows of that shard."""
        rows = slice(sum(self.shard_sizes[:shard]), sum(self.shard_sizes[:shard + 1]))
        if attr == "input_scale" and self.input_scale is not None:
            torch.maximum(self.input_scale, tensor.float().reshape(()), out=self.input_scale)
        elif attr == "weight" and tensor.dtype != FP8:
            self._set_rows(rows, *quantize_per_channel(_shaped(name, tensor, self._rows_shape(rows))))
        elif self.config.weight_format == FP8_BLOCK and attr in ("weight", "weight_scale_inv"):
            self._load_block_part(name, attr, tensor, shard, rows)
        elif attr == "weight" and self.config.weight_format != FLOAT:
            self.weight[rows] = _shaped(name, tensor, self._rows_shape(rows))
        elif attr == "weight_scale" and self.config.weight_format != FLOAT:
            scale = tensor.float().reshape(-1)
            if scale.numel() not in (1, rows.stop - rows.start):
                raise ValueError(f"checkpoint tensor {name} has {scale.numel()} scales: expected 1 (per tensor) "
                                 f"or {rows.stop - rows.start} (per channel)")
            self.weight_scale[rows] = scale   # a per-tensor scale fills its shard's rows: exact
        elif attr == "bias" and self.bias is not None:
            self.bias[rows] = _shaped(name, tensor, (rows.stop - rows.start,))
        else:
            raise ValueError(f"unexpected weight {name!r} for an fp8 layer loading {self.config.weight_format} "
                             "checkpoints")

    def _rows_shape(self, rows: slice) -> tuple[int, int]:
        return (rows.stop - rows.start, self.in_features)

    def _set_rows(self, rows: slice, q: torch.Tensor, scale: torch.Tensor) -> None:
        self.weight[rows] = q
        self.weight_scale[rows] = scale

    def _load_block_part(self, name: str, attr: str, tensor: torch.Tensor, shard: int, rows: slice) -> None:
        """Block scales: wait for both the fp8 weight and its scales, then dequantize in float32 and
        requantize per output channel (one shard in float32 at a time)."""
        part = self._pending.setdefault(shard, {})
        part[attr] = tensor
        if len(part) < 2:
            return
        del self._pending[shard]
        weight = _shaped(name, part["weight"], self._rows_shape(rows))
        bn, bk = self.config.block_size
        blocks = (-(-weight.shape[0] // bn), -(-weight.shape[1] // bk))
        scale_inv = _shaped(name, part["weight_scale_inv"], blocks)
        self._set_rows(rows, *quantize_per_channel(dequantize_blocks(weight, scale_inv, (bn, bk))))

    @torch.no_grad()
    def fill_dummy(self, generator: torch.Generator) -> None:
        """--load-format dummy: U(-1e-3, 1e-3) weights in float32, quantized; a static input scale of 1."""
        w = torch.empty(self.weight.shape, device=self.weight.device).uniform_(-1e-3, 1e-3, generator=generator)
        self._set_rows(slice(0, self.out_features), *quantize_per_channel(w))
        if self.bias is not None:
            self.bias.uniform_(-1e-3, 1e-3, generator=generator)
        if self.input_scale is not None:
            self.input_scale.fill_(1.0)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"fp8 from {self.config.weight_format}, static_input={self.config.static_input}")


def _shaped(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
    return tensor


def make_linear(in_features: int, shard_sizes: tuple[int, ...], bias: bool, quant: Fp8Config | None,
                shard_names: tuple[str, ...], row_parallel: TPGroup | None = None) -> nn.Module:
    """An nn.Linear (with shard_sizes), or an Fp8Linear unless the checkpoint leaves these modules unquantized.
    shard_names: the checkpoint's module names of the shards (q_proj, k_proj, v_proj of one layer).
    row_parallel: the TP group of a row-parallel layer (enabled), else None."""
    ignored = [quant is not None and quant.is_ignored(n) for n in shard_names]
    if any(ignored) != all(ignored):
        raise ValueError(f"quantization_config ignores some of the fused modules {shard_names}, not all: "
                         "not supported")
    if (quant is None or all(ignored)) and row_parallel is not None:
        return RowParallelLinear(in_features, sum(shard_sizes), bias, row_parallel)
    if quant is None or all(ignored):
        linear = nn.Linear(in_features, sum(shard_sizes), bias=bias)
        linear.shard_sizes = shard_sizes
        return linear
    return Fp8Linear(in_features, shard_sizes, bias, quant, row_parallel)
