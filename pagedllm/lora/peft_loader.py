"""A PEFT LoRA adapter directory read into per-module A/B tensors that fit our (partly fused) base model.

PEFT names: base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight (r, in) and .lora_B.weight
(out, r). q/k/v land in qkv_proj's shards 0/1/2 and gate/up in gate_up_proj's 0/1 (models/llama.py). An adapter of
a model whose HF modules are fused (Phi-3: qkv_proj, gate_up_proj) has one A and one B for the fused module: each
shard gets that A and its rows of B, so the parts are read as if the adapter had targeted them one by one (the
layer holds that A once: lora/layers.py's shared_a; tensors on the parts of such a module are refused).
Under tensor parallelism each rank keeps its part, cut where its base weight is (distributed/layers.py's
checkpoint_slice of the HF weight): a column-parallel module's (q/k/v, gate/up) B by output rows, A whole; a
row-parallel module's (o, down) A by input columns, B whole (lora/layers.py adds its partial product to the base's
before the all-reduce).
Everything we do not implement is a ValueError naming the adapter and the field, never a silent no-op.
"""
import hashlib
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pagedllm.lora.request import LoRAAdapterNotFoundError, LoRARequest, adapter_dir

# HF module -> (our module, shard index): the targets we serve
TARGETS = {"q_proj": ("self_attn.qkv_proj", 0), "k_proj": ("self_attn.qkv_proj", 1),
           "v_proj": ("self_attn.qkv_proj", 2), "o_proj": ("self_attn.o_proj", 0),
           "gate_proj": ("mlp.gate_up_proj", 0), "up_proj": ("mlp.gate_up_proj", 1), "down_proj": ("mlp.down_proj", 0)}
# HF modules that are fused in the HF model itself (Phi-3's qkv_proj, gate_up_proj): PEFT gives them one A and one
# B whose rows are the parts' rows in order, so each part is A with its rows of B (exact: one A times stacked Bs)
FUSED_TARGETS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
# the adapter's weights, in vLLM's order of preference
WEIGHTS_FILES = ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt")
_NAME = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
# options whose non-default value changes the math: (field, the value we implement). Those that only choose where
# PEFT put adapters (target_modules, layers_to_transform, layers_pattern, exclude_modules) are not here: the
# tensors say where, as vLLM reads them (a target_modules name this model lacks got no tensors).
_UNSUPPORTED = (("use_dora", False), ("bias", "none"), ("fan_in_fan_out", False),
                ("rank_pattern", {}), ("alpha_pattern", {}), ("modules_to_save", None),
                ("target_parameters", None), ("trainable_token_indices", None), ("lora_bias", False),
                ("use_qalora", False), ("megatron_config", None),
                # the same lora_A/lora_B tensors, other math: a deeper model built from repeated layers; the adapter
                # only on the tokens from its invocation sequence on (aLoRA); block-diagonal LoRA; Arrow's routing
                # among adapters; KaSA's truncated base weight and singular values between A and B
                ("layer_replication", None), ("alora_invocation_tokens", None), ("use_bdlora", None),
                ("arrow_config", None), ("kasa_config", None))


@dataclass
class LoRAModel:
    """An adapter on the host: per our module name, {shard index: (A (r, in), B (out, r) * scale)}, float32."""
    request: LoRARequest
    rank: int
    scale: float
    fingerprint: str = ""   # sha256 of its two files (and, once staged, of how it applies): its KV's identity
    #                         in the prefix cache and on disk
    modules: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)


def lora_cache_key(lora: LoRAModel) -> tuple[str, str]:
    """In the first block's hash: the adapter's weights, so two adapters (or an adapter and the base) never
    share KV, and an adapter replaced under the same name and path never meets its old KV (disk tier)."""
    return ("lora", lora.fingerprint)


def load_peft_adapter(req: LoRARequest, model: torch.nn.Module, max_lora_rank: int) -> LoRAModel:
    """Reads and checks req.lora_path against `model` (our LlamaForCausalLM family)."""
    where = f"LoRA adapter {req.lora_name!r} ({req.lora_path})"
    path = Path(adapter_dir(req))
    weights = next((path / name for name in WEIGHTS_FILES if (path / name).is_file()), None)
    for name, found in (("adapter_config.json", (path / "adapter_config.json").is_file()),
                        (" or ".join(WEIGHTS_FILES), weights is not None)):
        if not found:   # no adapter_config.json: no adapter there, vLLM's not-found
            error = LoRAAdapterNotFoundError if name == "adapter_config.json" else ValueError
            raise error(f"{where}: {name} not found (a PEFT adapter directory has adapter_config.json "
                        f"and adapter_model.safetensors, or PEFT's older adapter_model.bin)")
    cfg_bytes = (path / "adapter_config.json").read_bytes()
    try:
        cfg = json.loads(cfg_bytes)
    except ValueError as e:
        raise ValueError(f"{where}: adapter_config.json is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: adapter_config.json must hold a JSON object, got {type(cfg).__name__}")
    rank, alpha = cfg.get("r"), cfg.get("lora_alpha")
    _check_config(cfg, rank, alpha, max_lora_rank, where)
    scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    data = weights.read_bytes()
    tensors = _read_tensors(data, weights.name, where)
    lora = LoRAModel(req, rank, float(scale), hashlib.sha256(cfg_bytes + b"\0" + data).hexdigest())
    pairs: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    fused: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}   # (layer, kind, fused HF module) -> A, B
    # the embeddings' adapter first: PEFT saves the base embedding beside it (base_layer), whichever comes first
    for name, t in sorted(tensors.items(), key=lambda item: _EMBEDDINGS.search(item[0]) is None):
        m = _NAME.match(name)
        if m is None or m.group(3) not in TARGETS and m.group(3) not in FUSED_TARGETS:
            raise ValueError(f"{where}: tensor {name!r} targets {_module_of(name)}, "
                             + ("which vLLM serves LoRA on but pagedllm does not yet" if _EMBEDDINGS.search(name)
                                else "a module the model lacks or that LoRA serving does not support")
                             + f" (target_modules may be {sorted([*TARGETS, *FUSED_TARGETS])})")
        layer, kind, hf_module, ab = m.groups()
        if hf_module in FUSED_TARGETS:
            fused.setdefault((layer, kind, hf_module), {})[ab] = t.float()
            continue
        ours, shard = TARGETS[hf_module]
        pair = pairs.setdefault((f"model.layers.{layer}.{ours}", shard), {})
        pair[ab], pair["hf"] = t.float(), f"model.layers.{layer}.{kind}.{hf_module}.weight"
    for (layer, kind, hf_module), ab in fused.items():
        _split_fused(model, layer, kind, hf_module, ab, rank, pairs, where)
    _check_one_a(model, pairs, {f"model.layers.{layer}.{kind}.{m}" for layer, kind, m in fused}, where)
    if not pairs:
        raise ValueError(f"{where}: {weights.name} holds no LoRA tensors")
    for (module_name, shard), ab in pairs.items():
        a, b = _fit(model, module_name, shard, ab, rank, where)
        lora.modules.setdefault(module_name, {})[shard] = (a, b * scale)
    return lora


# the input and output embeddings' adapters (PEFT: lora_embedding_A/B; lm_head's lora_A/B)
_EMBEDDINGS = re.compile(r"\.(embed_tokens|lm_head)\.(lora_embedding_[AB]|lora_[AB]\.weight|base_layer\.weight)$")


def _module_of(tensor_name: str) -> str:
    """base_model.model.model.embed_tokens.lora_embedding_A -> model.embed_tokens (PEFT's prefix and the
    adapter part dropped), the module's name as the model has it."""
    return re.sub(r"\.(lora_\w*|base_layer)(\.\w+)*$", "", tensor_name.removeprefix("base_model.model."))


def _read_tensors(data: bytes, file_name: str, where: str) -> dict[str, torch.Tensor]:
    """safetensors, or a torch.save'd dict of tensors (PEFT's safe_serialization=False; vLLM reads both), the
    latter with weights_only: tensors only, no code from the file runs."""
    if file_name.endswith(".safetensors"):
        from safetensors.torch import load
        return load(data)
    try:
        tensors = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read the file is the adapter's error, named
        raise ValueError(f"{where}: {file_name} cannot be read as a dict of tensors: {type(e).__name__}: {e}") from None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise ValueError(f"{where}: {file_name} must hold a dict of tensor names to tensors")
    return tensors


def _check_config(cfg: dict, rank, alpha, max_lora_rank: int, where: str):
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{where}: peft_type must be LORA, got {cfg.get('peft_type')!r}")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{where}: r must be an integer >= 1, got {rank!r}")
    # vLLM's required field: PEFT's default (8) is not r, so a guess would scale the adapter wrongly
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"{where}: lora_alpha must be a number (adapter_config.json's scale of the adapter, "
                         f"lora_alpha / r), got {alpha!r}")
    if rank > max_lora_rank:
        raise ValueError(f"{where}: r = {rank} is above max_lora_rank ({max_lora_rank}); raise --max-lora-rank")
    for key, implemented in _UNSUPPORTED:
        value = cfg.get(key, implemented)
        if value != implemented and not (implemented is None and not value) and not (implemented == {} and not value):
            raise ValueError(f"{where}: {key} = {value!r} is not supported (only {implemented!r})")
    # its names are checked through the tensors' (_NAME, TARGETS), which say where the adapter is: so null is
    # taken, as vLLM (which requires the key only)
    if "target_modules" not in cfg:
        raise ValueError(f"{where}: target_modules is missing from adapter_config.json (a list of module names, "
                         f"a regex, or null)")
    targets = cfg["target_modules"]
    if not (targets is None or isinstance(targets, str)
            or isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise ValueError(f"{where}: target_modules must be a list of module names, a regex or null, got {targets!r}")


def _fit(model, module_name: str, shard: int, ab: dict, rank: int, where: str):
    """A (r, in) and B (out, r) of one shard, checked against the base module's shapes (the whole checkpoint's
    along the dimension a tensor-parallel rank cuts), then this rank's part of them."""
    ab = dict(ab)
    hf_name = ab.pop("hf")
    if set(ab) != {"A", "B"}:
        raise ValueError(f"{where}: {module_name} shard {shard} has lora_{'A' if 'A' in ab else 'B'} without "
                         f"its pair")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        raise ValueError(f"{where}: the model has no module {module_name} (a different base model?)") from None
    sizes = getattr(module, "shard_sizes", (module.out_features,))
    expected = {"A": [rank, module.in_features], "B": [sizes[shard], rank]}
    cut = _rank_cut(model, hf_name)
    if cut is not None:   # the weight's dim 0 (out) is B's, its dim 1 (in) is A's
        dim, start, stop, whole = cut
        expected["B" if dim == 0 else "A"][dim] = whole
    for k in "AB":
        if list(ab[k].shape) != expected[k]:
            raise ValueError(f"{where}: lora_{k} of {module_name} shard {shard} has shape {tuple(ab[k].shape)}, "
                             f"the base model needs {tuple(expected[k])} (an adapter of another base model?)")
    if cut is None:
        return ab["A"], ab["B"]
    if dim == 0:
        return ab["A"], ab["B"][start:stop].clone()   # a copy: the whole tensor is not kept
    return ab["A"][:, start:stop].clone(), ab["B"]


def _split_fused(model, layer: str, kind: str, hf_module: str, ab: dict, rank: int, pairs: dict, where: str):
    """A fused HF module's A (r, in) and B (sum of its parts' rows, r) into pairs as its parts': each part that A
    and its rows of B (the whole checkpoint's rows: _fit cuts a tensor-parallel rank's from them)."""
    module_name = f"model.layers.{layer}.{kind}.{hf_module}"   # our fused linear of the same name
    if set(ab) != {"A", "B"}:
        raise ValueError(f"{where}: {module_name} has lora_{'A' if 'A' in ab else 'B'} without its pair")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        raise ValueError(f"{where}: the model has no module {module_name} (a different base model?)") from None
    parts = FUSED_TARGETS[hf_module]
    hf_names = [f"model.layers.{layer}.{kind}.{part}.weight" for part in parts]
    local = getattr(module, "shard_sizes", (module.out_features,))
    rows = [local[i] if (cut := _rank_cut(model, n)) is None else cut[3] for i, n in enumerate(hf_names)]
    if ab["B"].dim() != 2 or ab["B"].shape[0] != sum(rows):
        raise ValueError(f"{where}: lora_B of {module_name} has shape {tuple(ab['B'].shape)}, the base model needs "
                         f"({sum(rows)}, {rank}) (an adapter of another base model?)")
    for shard, (part, hf_name, b) in enumerate(zip(parts, hf_names, ab["B"].split(rows))):
        if (module_name, shard) in pairs:
            raise ValueError(f"{where}: the adapter targets both {hf_module} and {part} of layer {layer}")
        pairs[(module_name, shard)] = {"A": ab["A"], "B": b, "hf": hf_name}


def _check_one_a(model, pairs: dict, from_fused: set[str], where: str):
    """A module the HF model holds fused (model.hf_fused_modules: Phi-3's qkv_proj, gate_up_proj) takes one A for
    all its parts (lora/layers.py holds it once), as PEFT saves an adapter of that model; tensors on its parts
    (q_proj, ...) each bring their own A. from_fused: our modules filled from a fused module's tensors."""
    hf_fused = getattr(model, "hf_fused_modules", ())
    for (module_name, _), ab in pairs.items():
        fused_name = module_name.rsplit(".", 1)[1]
        if fused_name in hf_fused and module_name not in from_fused:
            layer, part = ab["hf"].split(".")[2], ab["hf"].split(".")[-2]
            raise ValueError(f"{where}: it targets {part} of layer {layer}, a part of {fused_name}, which "
                             f"{type(model).__name__} holds as one module: its adapters have one lora_A and one "
                             f"lora_B on {fused_name}, as PEFT saves them")


def _rank_cut(model, hf_weight: str) -> tuple[int, int, int, int] | None:
    """(dim, start, stop, whole length) of HF weight hf_weight that this tensor-parallel rank holds, dim in the
    weight's (out, in); None: the whole (tensor parallelism off)."""
    tp = getattr(model, "tp", None)
    if tp is None or not tp.enabled:
        return None
    from pagedllm.distributed.layers import layer_cut
    from pagedllm.models.llama import head_dim
    return layer_cut(hf_weight.split(".")[-2], model.config, head_dim(model.config), tp)
