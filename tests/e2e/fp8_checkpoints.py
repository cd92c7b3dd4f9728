"""Pre-quantized FP8 checkpoints of a float32 model dir, written the way each published format stores them
(test helper of tests/e2e/test_fp8_weights.py)."""
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pagedllm.layers.quantization.fp8 import FP8, FP8_MAX, quantize, quantize_per_channel

# Phi-3's checkpoints store qkv_proj and gate_up_proj fused: quantized as one tensor each, as its FP8 releases are
LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn\.([qkvo]|qkv)_proj|mlp\.(gate|up|down|gate_up)_proj)\.weight$")
BLOCK = (32, 32)
INPUT_SCALES = {"q_proj": 0.02, "k_proj": 0.03, "v_proj": 0.025, "o_proj": 0.01, "gate_proj": 0.02,
                "up_proj": 0.02, "down_proj": 0.01, "qkv_proj": 0.03,
                "gate_up_proj": 0.02}   # static activation scales per shard (q/k/v differ: max)

# kind -> quantization_config
CONFIGS = {
    "fp8_tensor_dynamic": {"quant_method": "fp8", "activation_scheme": "dynamic"},
    "fp8_tensor_static": {"quant_method": "fp8", "activation_scheme": "static"},
    "fp8_block": {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": list(BLOCK)},
    "ct_channel_dynamic": {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
                           "config_groups": {"group_0": {
                               "targets": ["Linear"],
                               "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "dynamic": False,
                                           "symmetric": True},
                               "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                                                     "dynamic": True, "symmetric": True}}}},
    "ct_tensor_static": {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
                         "config_groups": {"group_0": {
                             "targets": ["Linear"],
                             "weights": {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False},
                             "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor",
                                                   "dynamic": False}}}},
}
KV_SCALE_NAMES = {"fp8_tensor_static": ("self_attn.k_proj.output_scale", "self_attn.v_proj.output_scale"),
                  "ct_tensor_static": ("self_attn.k_scale", "self_attn.v_scale"),
                  "fp8_tensor_dynamic": ("self_attn.kv_scale",)}


def kv_scale(layer: int, which: int) -> float:
    return 0.5 + 0.25 * layer + 0.125 * which


def write_quantized(src: str, dst: Path, kind: str, ignore: tuple[str, ...] = ()) -> str:
    """src's weights in the format of `kind` (CONFIGS), with KV scales where KV_SCALE_NAMES lists some;
    `ignore` (compressed-tensors): extra module regexes left in float32."""
    shutil.copytree(src, dst)
    tensors = load_file(str(Path(src) / "model.safetensors"))
    out = {}
    for name, w in tensors.items():
        module = name.removesuffix(".weight")
        if LINEAR.match(name) and not any(re.match(p, module) for p in ignore):
            out.update(_quantize(module, w, kind))
        else:
            out[name] = w
    for name, layer in _layers(tensors):
        for i, suffix in enumerate(KV_SCALE_NAMES.get(kind, ())):
            out[f"{name}.{suffix}"] = torch.tensor(kv_scale(layer, i))
    save_file(out, str(dst / "model.safetensors"))
    config = json.loads((dst / "config.json").read_text())
    qc = json.loads(json.dumps(CONFIGS[kind]))
    if ignore:
        qc["ignore"] += [f"re:{p}" for p in ignore]
    config["quantization_config"] = qc
    (dst / "config.json").write_text(json.dumps(config))
    return str(dst)


def _layers(tensors):
    layers = sorted({int(n.split(".")[2]) for n in tensors if n.startswith("model.layers.")})
    return [(f"model.layers.{i}", i) for i in layers]


def _quantize(module: str, w: torch.Tensor, kind: str) -> dict[str, torch.Tensor]:
    if kind == "ct_channel_dynamic":
        q, scale = quantize_per_channel(w)
        return {f"{module}.weight": q, f"{module}.weight_scale": scale[:, None]}   # (N, 1) as compressed-tensors
    if kind == "fp8_block":
        return _quantize_blocks(module, w)
    scale = (w.abs().amax() / FP8_MAX).float()
    out = {f"{module}.weight": quantize(w, scale)}
    static = kind.endswith("static")
    shape = (1,) if kind.startswith("ct") else ()
    out[f"{module}.weight_scale"] = scale.reshape(shape)
    if static:
        out[f"{module}.input_scale"] = torch.tensor(INPUT_SCALES[module.rpartition(".")[2]]).reshape(shape)
    return out


def _quantize_blocks(module: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    bn, bk = BLOCK
    n, k = w.shape
    blocks = w.reshape(n // bn, bn, k // bk, bk)
    scale = blocks.abs().amax(dim=(1, 3)) / FP8_MAX                        # (n / bn, k / bk)
    q = quantize(blocks, scale[:, None, :, None]).reshape(n, k)
    assert q.dtype == FP8
    return {f"{module}.weight": q, f"{module}.weight_scale_inv": scale}
