"""Loading HF-named checkpoint tensors into a model of models/llama.py (and the families built on it).

Our two fused projections are stacked along the output dim, each a row range a checkpoint shard fills:
    qkv_proj.weight     = [q_proj; k_proj; v_proj]     rows: Hq*D | Hkv*D | Hkv*D
    gate_up_proj.weight = [gate_proj; up_proj]         rows: I | I
An Fp8Linear takes each shard's tensors itself (quantizing float ones); KV cache scales go to the Attention
layers' floats; mixture-of-experts checkpoints' per-expert tensors go into their rows of the stacked experts.
Under tensor parallelism the loader hands in this rank's slices; only the vocab-parallel tensors are cut here.
"""
from collections.abc import Iterable

import re

import torch
from torch import nn

from pagedllm.layers.moe import Experts, expert_shard
from pagedllm.layers.quantization.fp8_linear import Fp8Linear
from pagedllm.layers.quantization.kv_scales import kv_scale_target

# HF shard name -> (our fused module, shard index)
_STACKED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
            "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
_VOCAB_PARALLEL = ("model.embed_tokens.weight", "lm_head.weight")
# our fused module -> the HF shards it stacks, in row order
UNSTACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@torch.no_grad()
def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy HF-named checkpoint tensors into our (partly fused) parameters; every parameter must be hit."""
    params = dict(model.named_parameters())
    fused_experts = _fused_expert_names(model)
    loaded = set()
    for name, tensor in weights:
        name = checkpoint_name(type(model), name)
        if name is None or "rotary_emb." in name or (model.tied and name == "lm_head.weight"):
            continue
        if _load_kv_scale(model, name, tensor) or _load_expert_shard(model, name, tensor, loaded):
            continue
        module, attr, shard = _quantized_destination(model, name)
        if module is not None:
            module.load_shard(name, attr, tensor, shard)
        else:
            dest = _destination(model, name, params)
            if model.tp.enabled and name in _VOCAB_PARALLEL:   # the last rank: real rows, then padding
                dest = dest.narrow(0, 0, min(tensor.shape[0], dest.shape[0]))
            if dest.shape != tensor.shape:
                raise ValueError(f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, "
                                 f"{type(model).__name__} expects {tuple(dest.shape)}")
            dest.copy_(tensor)
        loaded.update(fused_experts.get(name, (name,)))   # a fused experts tensor: all of its experts
    missing = sorted(_checkpoint_names(model) - loaded)
    if missing:
        raise ValueError(f"{len(missing)} parameters not found in the checkpoint: {missing[:8]}")


def checkpoint_name(model_cls: type, name: str) -> str | None:
    """A checkpoint tensor's name as model_cls's own modules would be named in transformers (its weight_renames
    applied: Mixtral's MLP, a vision-language checkpoint's language model); None: one it does not read
    (skipped_weights: a vision tower)."""
    if any(re.match(pattern, name) for pattern in model_cls.skipped_weights):
        return None
    for pattern, replacement in model_cls.weight_renames:
        name = re.sub(pattern, replacement, name)
    return name


def _load_kv_scale(model: nn.Module, name: str, tensor: torch.Tensor) -> bool:
    """A KV cache scale: set as a python float on its Attention layer (read once, at load)."""
    target = kv_scale_target(name)
    if target is None:
        return False
    attn = model.get_submodule(target[0])
    for attr in target[1]:
        setattr(attn, attr, float(tensor.float().reshape(-1)[0]))
    return True


def _load_expert_shard(model: nn.Module, name: str, tensor: torch.Tensor, loaded: set) -> bool:
    """One expert's linear (Hub checkpoints' per-expert layout) copied into its rows of the stacked weights;
    a stacked experts tensor (whole in the checkpoint) cut to this rank's share."""
    module_name, _, attr = name.rpartition(".")
    if attr in ("gate_up_proj", "down_proj") and module_name.endswith(".experts"):
        experts = _experts_at(model, module_name)
        if experts is not None:
            experts.load_stacked(attr, tensor)
            loaded.update(experts.checkpoint_shard_names(module_name)[attr])
            return True
    shard = expert_shard(name)
    if shard is None:
        return False
    experts_name, expert, proj = shard
    experts = _experts_at(model, experts_name)
    if experts is None or expert >= experts.num_experts:
        raise ValueError(f"unexpected weight {name!r} in the checkpoint of {type(model).__name__}")
    experts.load_expert_shard(expert, proj, tensor)
    loaded.add(name)
    return True


def _experts_at(model: nn.Module, module_name: str) -> Experts | None:
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return None
    return module if isinstance(module, Experts) else None


def _fused_expert_names(model: nn.Module) -> dict[str, list[str]]:
    """Stacked experts parameter name -> the per-expert checkpoint names it stands for."""
    return {f"{module_name}.{attr}": names for module_name, module in model.named_modules()
            if isinstance(module, Experts)
            for attr, names in module.checkpoint_shard_names(module_name).items()}


def _quantized_destination(model: nn.Module, name: str) -> tuple[Fp8Linear | None, str, int]:
    """The Fp8Linear (with attr and shard index) that HF tensor `name` goes to, else (None, "", 0)."""
    module_name, shard, attr = _split_name(name)
    fused, index = _STACKED.get(shard, (shard, 0))
    try:
        module = model.get_submodule(".".join(filter(None, (module_name, fused))))
    except AttributeError:
        return None, "", 0
    return (module, attr, index) if isinstance(module, Fp8Linear) else (None, "", 0)


def _destination(model: nn.Module, name: str, params: dict) -> torch.Tensor:
    """The parameter (or row range of a fused one) that HF tensor `name` fills."""
    module_name, shard, attr = _split_name(name)
    if shard not in _STACKED:
        if name not in params:
            raise ValueError(f"unexpected weight {name!r} in the checkpoint of {type(model).__name__}")
        return params[name]
    fused, index = _STACKED[shard]
    target = f"{module_name}.{fused}.{attr}"
    if target not in params:
        raise ValueError(f"unexpected weight {name!r} in the checkpoint of {type(model).__name__}")
    sizes = model.get_submodule(f"{module_name}.{fused}").shard_sizes
    return params[target].narrow(0, sum(sizes[:index]), sizes[index])


def _checkpoint_names(model: nn.Module) -> set[str]:
    """HF names the checkpoint must provide: our names, fused ones expanded into their shards
    (an Fp8Linear's: what its checkpoint kind stores, not its own parameters)."""
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, Experts):   # per expert, as Hub checkpoints hold them (or the stacked tensors)
            names.update(n for shards in module.checkpoint_shard_names(module_name).values() for n in shards)
            continue
        attrs = (module.checkpoint_attrs() if isinstance(module, Fp8Linear)
                 else [n for n, _ in module.named_parameters(recurse=False)])
        parent, _, leaf = module_name.rpartition(".")
        for shard in UNSTACKED.get(leaf, (leaf,)):
            names.update(".".join(filter(None, (parent, shard, attr))) for attr in attrs)
    if model.tied:
        names.discard("lm_head.weight")
    return names


def _split_name(name: str) -> tuple[str, str, str]:
    """'model.layers.0.self_attn.q_proj.weight' -> ('model.layers.0.self_attn', 'q_proj', 'weight')."""
    module_path, _, attr = name.rpartition(".")
    parent, _, leaf = module_path.rpartition(".")
    return parent, leaf, attr
