"""Build a model on its device and dtype, then fill it from safetensors (or with dummy random weights).

Tensor parallelism (tp.size > 1): the model is built with this rank's shapes, and each checkpoint tensor is
read as the slice this rank holds (safetensors get_slice: only those bytes), one tensor at a time.
Checkpoints that store q/k/v or gate/up fused (Phi-3's qkv_proj, gate_up_proj) are read as their parts, each
named as Llama's checkpoints name it (q_proj, ...), so the model, FP8 and TP see per-shard tensors only: a rank's
slice of a fused tensor is its slice of each part, not one run of rows.
"""
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from pagedllm.distributed.layers import checkpoint_slice, take_slice
from pagedllm.distributed.parallel_state import TPGroup
from pagedllm.layers.norm import RMSNorm
from pagedllm.layers.rotary import RotaryEmbedding
from pagedllm.layers.quantization.fp8 import FP8
from pagedllm.layers.quantization.fp8_config import fp8_config
from pagedllm.layers.quantization.fp8_linear import Fp8Linear
from pagedllm.layers.quantization.fuse import fuse_fp8_inputs
from pagedllm.models import get_model_class, head_dim
from pagedllm.models.weights import UNSTACKED, checkpoint_name

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
_SCALE_SUFFIXES = ("_scale", "_scale_inv")   # weight_scale, input_scale, k_scale, output_scale, ...


def load_model(model_dir: str, hf_config, dtype: torch.dtype, device: torch.device,
               load_format: str = "auto", quantization: str | None = None, tp: TPGroup = TPGroup(),
               max_model_len: int | None = None) -> nn.Module:
    """quantization: EngineConfig.quantization; a checkpoint's own quantization_config is used in any case.
    Quantized layers are built in fp8 and quantize each checkpoint tensor as it streams in: no float copy.
    max_model_len: the engine's, for rotary tables that depend on it (longrope); None: max_position_embeddings."""
    if load_format not in ("auto", "safetensors", "dummy"):
        raise ValueError(f"load_format must be one of ('auto', 'safetensors', 'dummy'), got {load_format!r}")
    _require(Path(model_dir) / "config.json", "the model's HF config")
    quant = fp8_config(quantization, hf_config)
    model_cls = get_model_class(hf_config.architectures)
    model = _build(model_cls, hf_config, quant, dtype, torch.device(device), tp)
    if max_model_len is not None:
        for module in model.modules():
            if isinstance(module, RotaryEmbedding):
                module.fit(max_model_len)
    where, block = None, quant.block_size if quant is not None else None
    if tp.enabled:
        dim = head_dim(hf_config)

        def where(name: str, shape) -> tuple[int, int, int] | None:   # cut by the model's name (its vocab rows)
            return checkpoint_slice(checkpoint_name(model_cls, name), shape, hf_config, dim, tp, block)
    if load_format == "dummy" and where is not None:
        model.load_weights((name, take_slice(t, where(name, t.shape)))
                           for name, t in _dummy_tensors(model_cls, hf_config, dtype, device))
    elif load_format == "dummy":
        _init_dummy(model)
    else:
        model.load_weights(_iter_safetensors(Path(model_dir), dtype, device, where, _fused_parts(hf_config, block),
                                             read=lambda name: checkpoint_name(model_cls, name) is not None))
    if quant is not None and torch.device(device).type == "cuda":
        fuse_fp8_inputs(model)
    return model.eval().requires_grad_(False)


def _build(model_cls, hf_config, quant, dtype: torch.dtype, device: torch.device, tp: TPGroup) -> nn.Module:
    # Parameters are created where they will live, in their final dtype: no float32 CPU copy first.
    with _default_dtype(dtype), device:
        if tp.enabled:
            return model_cls(hf_config, quant, tp=tp)
        return model_cls(hf_config, quant) if quant is not None else model_cls(hf_config)


@contextmanager
def _default_dtype(dtype: torch.dtype):
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


def _iter_safetensors(model_dir: Path, dtype: torch.dtype, device, where=None, fused=lambda name, shape: None,
                      read=lambda name: True) -> Iterator[tuple[str, torch.Tensor]]:
    """where(name, shape): the (dim, start, stop) of the tensor this rank holds, None: all of it (tp.size 1: no
    call). fused(name, shape): a fused tensor's parts [(part name, first row, end row) | (part name, None)], the
    latter a scalar every part shares; None: not fused. read(name): False for a tensor left unread (a vision
    tower's, where only the text part is served)."""
    for path in _safetensors_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in filter(read, f.keys()):
                part = f.get_slice(name)
                parts = fused(name, part.get_shape())
                for part_name, rows in parts or [(name, None)]:
                    source = part if rows is None else part[rows[0]:rows[1]]
                    cut = None if where is None else where(part_name, tuple(source.shape if rows else
                                                                             part.get_shape()))
                    # whole tensors read whole: a 0-d one (a per-tensor scale) has no slice to take
                    if rows is None:
                        tensor = f.get_tensor(name) if cut is None else take_slice(part, cut)
                    else:
                        tensor = take_slice(source, cut)
                    yield part_name, tensor.to(device=device, dtype=_target_dtype(name, tensor.dtype, dtype))


# a fused checkpoint module -> its parts, as Llama's checkpoints name them
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _fused_parts(hf_config, block: tuple[int, int] | None):
    """fused(name, shape) for _iter_safetensors: the rows of each part of a fused weight, bias or per-channel
    scale; a per-tensor scale (one value) or input scale given to every part; block scales by whole blocks."""
    dim = head_dim(hf_config)
    num_kv = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    sizes = {"qkv_proj": (hf_config.num_attention_heads * dim, num_kv * dim, num_kv * dim),
             "gate_up_proj": (getattr(hf_config, "intermediate_size", 0),) * 2}

    def fused(name: str, shape) -> list | None:
        module, _, attr = name.rpartition(".")
        parent, _, leaf = module.rpartition(".")
        if leaf not in _FUSED:
            return None
        names = [f"{parent}.{part}.{attr}" for part in _FUSED[leaf]]
        if math.prod(shape) == 1 or attr == "input_scale":
            return [(n, None) for n in names]
        rows = sizes[leaf]
        if attr == "weight_scale_inv":
            if block is None or any(r % block[0] for r in rows[:-1]):
                raise ValueError(f"checkpoint tensor {name}: its parts' rows {list(rows)} are not whole blocks of "
                                 f"quantization_config.weight_block_size {list(block or [])}")
            rows = tuple(-(-r // block[0]) for r in rows)
        if shape[0] != sum(rows):
            raise ValueError(f"checkpoint tensor {name} has {shape[0]} rows, its parts {_FUSED[leaf]} {sum(rows)}")
        starts = [sum(rows[:i]) for i in range(len(rows))]
        return [(n, (start, start + r)) for n, start, r in zip(names, starts, rows)]
    return fused


def _target_dtype(name: str, stored: torch.dtype, dtype: torch.dtype) -> torch.dtype:
    """Float tensors in the model dtype; fp8 weights as stored; quantization scales in float32."""
    if stored == FP8:
        return stored
    return torch.float32 if name.endswith(_SCALE_SUFFIXES) else dtype


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / _INDEX
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        for shard in shards:
            _require(model_dir / shard, f"a weight shard listed in {index}")
        return [model_dir / shard for shard in shards]
    if not (model_dir / _SINGLE).exists():
        # no index and no model.safetensors: every *.safetensors file, as vLLM reads such a directory (shards whose
        # index was not copied, a single file of another name)
        files = sorted(model_dir.glob("*.safetensors"))
        if files:
            return files
    # weights in a format not read here: name them, or the directory looks empty of weights
    others = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
    found = f"; found {', '.join(others)}, but only safetensors checkpoints are read" if others else ""
    return [_require(model_dir / _SINGLE, f"weights: {_SINGLE} or {_INDEX} with its shards{found}")]


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: expected {what}")
    return path


@torch.no_grad()
def _init_dummy(model: nn.Module) -> None:
    """Random weights of the right shapes, like vLLM's dummy format: U(-1e-3, 1e-3), norms 1 + U(-1e-3, 1e-3).
    One generator per tensor, seeded with its index, so the values do not depend on what else ran (and
    _dummy_tensors gives the same ones)."""
    norm_weights = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    fp8_layers = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    fp8_params = {id(p) for m in fp8_layers for p in m.parameters()}
    by_weight = {id(m.weight): m for m in fp8_layers}
    for i, (_, param) in enumerate(model.named_parameters()):
        gen = torch.Generator(device=param.device).manual_seed(i)
        if id(param) in by_weight:   # float weights quantized; the layer fills its scales and bias with them
            by_weight[id(param)].fill_dummy(gen)
        if id(param) in fp8_params:
            continue
        param.uniform_(-1e-3, 1e-3, generator=gen)
        if id(param) in norm_weights:
            param.add_(1.0)


@torch.no_grad()
def _dummy_tensors(model_cls, hf_config, dtype: torch.dtype, device) -> Iterator[tuple[str, torch.Tensor]]:
    """The whole model's dummy weights as HF-named tensors, one at a time, each equal to what _init_dummy gives
    the same parameter at TP=1 (same order, seeds and shapes: read off a TP=1 model on the meta device)."""
    with _default_dtype(dtype), torch.device("meta"):
        full = model_cls(hf_config)
    norm_weights = {id(m.weight) for m in full.modules() if isinstance(m, RMSNorm)}
    for i, (name, param) in enumerate(full.named_parameters()):
        gen = torch.Generator(device=device).manual_seed(i)
        tensor = torch.empty(param.shape, dtype=dtype, device=device).uniform_(-1e-3, 1e-3, generator=gen)
        if id(param) in norm_weights:
            tensor.add_(1.0)
        module_path, _, attr = name.rpartition(".")
        parent, _, leaf = module_path.rpartition(".")
        if leaf not in UNSTACKED:
            yield name, tensor
            continue
        sizes = full.get_submodule(module_path).shard_sizes
        for shard, part in zip(UNSTACKED[leaf], tensor.split(list(sizes), dim=0)):
            yield f"{parent}.{shard}.{attr}", part
