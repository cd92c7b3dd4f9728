"""What `--quantization fp8` and a checkpoint's `quantization_config` mean for the linear layers.

Checkpoint kinds (config.json's quantization_config, used whether or not --quantization is given, as vLLM):
- none: float weights, quantized per output channel at load (only with --quantization fp8).
- quant_method "fp8" (vLLM / HF): fp8 weights with per-tensor `weight_scale` per shard (or per channel),
  activation_scheme dynamic or static (`input_scale`); or weight_block_size [bn, bk] with `weight_scale_inv`
  per block (dynamic activations only), dequantized in float32 at load and requantized per channel.
- quant_method "compressed-tensors": float 8-bit weights, strategy channel or tensor; input_activations
  dynamic (per token) or static per tensor (`input_scale`); `ignore` lists layers left unquantized.
"""
import re
from dataclasses import dataclass

FLOAT, FP8_SCALED, FP8_BLOCK = "float", "fp8", "fp8_block"   # what the checkpoint stores for a linear weight


@dataclass(frozen=True)
class Fp8Config:
    weight_format: str = FLOAT
    static_input: bool = False                 # the checkpoint gives input_scale (one per layer input)
    block_size: tuple[int, int] | None = None  # FP8_BLOCK: rows, columns of a scale block
    ignore: tuple[str, ...] = ()               # module names ("re:" regex) kept unquantized

    def is_ignored(self, prefix: str) -> bool:
        return any(re.match(e[3:], prefix) if e.startswith("re:") else prefix == e or prefix.endswith("." + e)
                   for e in self.ignore)

    def checkpoint_attrs(self) -> tuple[str, ...]:
        """The tensors the checkpoint holds per linear (besides bias)."""
        if self.weight_format == FP8_BLOCK:
            return ("weight", "weight_scale_inv")
        if self.weight_format == FP8_SCALED:
            return ("weight", "weight_scale", "input_scale") if self.static_input else ("weight", "weight_scale")
        return ("weight",)


def fp8_config(quantization: str | None, hf_config) -> Fp8Config | None:
    """The linear layers' quantization: the checkpoint's own if it has one, else --quantization's."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return Fp8Config() if quantization == "fp8" else None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    method = qc.get("quant_method")
    if method == "fp8":
        return _from_fp8(qc)
    if method == "compressed-tensors":
        return _from_compressed_tensors(qc)
    raise ValueError(f"quantization_config.quant_method {method!r} is not supported "
                     "(supported: 'fp8', 'compressed-tensors' with float 8-bit weights)")


def _from_fp8(qc: dict) -> Fp8Config:
    scheme = qc.get("activation_scheme", "dynamic")
    if scheme not in ("dynamic", "static"):
        raise ValueError(f"quantization_config.activation_scheme must be 'dynamic' or 'static', got {scheme!r}")
    ignore = tuple(qc.get("ignored_layers") or ()) + tuple(qc.get("modules_to_not_convert") or ())
    block = qc.get("weight_block_size")
    if block is None:
        return Fp8Config(FP8_SCALED, scheme == "static", None, ignore)
    if len(block) != 2 or scheme != "dynamic":
        raise ValueError(f"quantization_config.weight_block_size {block!r} with activation_scheme {scheme!r}: "
                         "only [rows, cols] with dynamic activations is supported")
    return Fp8Config(FP8_BLOCK, False, (int(block[0]), int(block[1])), ignore)


def _from_compressed_tensors(qc: dict) -> Fp8Config:
    groups = qc.get("config_groups") or {}
    if not groups:
        raise ValueError("quantization_config.config_groups: compressed-tensors config without groups")
    schemes = {_group_scheme(name, group) for name, group in groups.items()}
    if len(schemes) != 1:
        raise ValueError(f"quantization_config.config_groups: groups with different schemes {sorted(schemes)} "
                         "are not supported")
    static_input, = schemes
    config = Fp8Config(FP8_SCALED, static_input, None, tuple(qc.get("ignore") or ()))
    if not config.is_ignored("lm_head"):
        raise ValueError("quantization_config.ignore must list lm_head: a quantized lm_head is not supported")
    return config


def _group_scheme(name: str, group: dict) -> bool:
    """A compressed-tensors config group -> static_input; ValueError naming the field it cannot serve."""
    field = f"quantization_config.config_groups.{name}"
    w = group.get("weights") or {}
    if w.get("num_bits") != 8 or w.get("type") != "float" or w.get("strategy") not in ("channel", "tensor") \
            or w.get("dynamic", False):
        raise ValueError(f"{field}.weights {w!r} is not supported: only float 8-bit weights, strategy 'channel' "
                         "or 'tensor', static")
    a = group.get("input_activations")
    if a is None:
        raise ValueError(f"{field}.input_activations is null (fp8 weight-only): not supported, only W8A8")
    if a.get("num_bits") != 8 or a.get("type") != "float":
        raise ValueError(f"{field}.input_activations {a!r} is not supported: only float 8-bit")
    if a.get("dynamic"):
        return False          # per token (a dynamic per-tensor scheme gets per-token scales: finer)
    if a.get("strategy") != "tensor":
        raise ValueError(f"{field}.input_activations.strategy {a.get('strategy')!r}: static activations "
                         "need strategy 'tensor'")
    return True
