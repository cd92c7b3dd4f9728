"""Build a model on its device and dtype, then fill it from safetensors (or with dummy random weights).

Tensor parallelism (tp.size > 1): the model is built with this rank's shapes, and each checkpoint tensor is
read as the slice this rank holds (safetensors get_slice: only those bytes), one tensor at a time.
"""
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from pagedllm.distributed.layers import checkpoint_slice, take_slice
from pagedllm.distributed.parallel_state import TPGroup
from pagedllm.layers.norm import RMSNorm
from pagedllm.layers.quantization.fp8 import FP8
from pagedllm.layers.quantization.fp8_config import fp8_config
from pagedllm.layers.quantization.fp8_linear import Fp8Linear
from pagedllm.layers.quantization.fuse import fuse_fp8_inputs
from pagedllm.models import get_model_class, head_dim
from pagedllm.models.llama import _UNSTACKED

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
_SCALE_SUFFIXES = ("_scale", "_scale_inv")   # weight_scale, input_scale, k_scale, output_scale, ...


def load_model(model_dir: str, hf_config, dtype: torch.dtype, device: torch.device,
               load_format: str = "auto", quantization: str | None = None, tp: TPGroup = TPGroup()) -> nn.Module:
    """quantization: EngineConfig.quantization; a checkpoint's own quantization_config is used in any case.
    Quantized layers are built in fp8 and quantize each checkpoint tensor as it streams in: no float copy."""
    if load_format not in ("auto", "safetensors", "dummy"):
        raise ValueError(f"load_format must be one of ('auto', 'safetensors', 'dummy'), got {load_format!r}")
    _require(Path(model_dir) / "config.json", "the model's HF config")
    quant = fp8_config(quantization, hf_config)
    model_cls = get_model_class(hf_config.architectures)
    model = _build(model_cls, hf_config, quant, dtype, torch.device(device), tp)
    where = None
    if tp.enabled:
        dim = head_dim(hf_config)
        block = quant.block_size if quant is not None else None
        where = lambda name, shape: checkpoint_slice(name, shape, hf_config, dim, tp, block)   # noqa: E731
    if load_format == "dummy" and where is not None:
        model.load_weights((name, take_slice(t, where(name, t.shape)))
                           for name, t in _dummy_tensors(model_cls, hf_config, dtype, device))
    elif load_format == "dummy":
        _init_dummy(model)
    else:
        model.load_weights(_iter_safetensors(Path(model_dir), dtype, device, where))
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


def _iter_safetensors(model_dir: Path, dtype: torch.dtype, device, where=None) -> Iterator[tuple[str, torch.Tensor]]:
    """where(name, shape): the (dim, start, stop) of the tensor this rank holds, None: all of it (tp.size 1: no
    call)."""
    for path in _safetensors_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                part = None if where is None else f.get_slice(name)
                cut = None if part is None else where(name, part.get_shape())
                # whole tensors read whole: a 0-d one (a per-tensor scale) has no slice to take
                tensor = f.get_tensor(name) if cut is None else take_slice(part, cut)
                yield name, tensor.to(device=device, dtype=_target_dtype(name, tensor.dtype, dtype))


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
        if leaf not in _UNSTACKED:
            yield name, tensor
            continue
        sizes = full.get_submodule(module_path).shard_sizes
        for shard, part in zip(_UNSTACKED[leaf], tensor.split(list(sizes), dim=0)):
            yield f"{parent}.{shard}.{attr}", part
