"""What mixture-of-experts models share: the features whose layers have no expert path yet are refused, naming
the field, rather than run wrong (FP8 would leave the experts unquantized or fail on an FP8 checkpoint's scales,
LoRA's wrappers know no stacked experts). Tensor parallelism runs: each rank holds every expert's I/N
(layers/moe.py)."""
from pagedllm.distributed.parallel_state import TPGroup
from pagedllm.models.llama import LlamaForCausalLM


def moe_refusal(arch: str, quantization: str | None, enable_lora: bool) -> str | None:
    """Why an engine config cannot run a mixture-of-experts model `arch` (naming the field), else None."""
    why = f"is not supported for {arch} (mixture of experts) yet"
    if quantization is not None:
        return f"quantization={quantization!r} {why}: the experts' stacked weights have no FP8 path"
    if enable_lora:
        return f"enable_lora=True {why}: LoRA adapters wrap dense linears, not the stacked experts"
    return None


class MoeForCausalLM(LlamaForCausalLM):
    def __init__(self, config, quant=None, tp: TPGroup = TPGroup()):
        # quant: --quantization fp8 or the checkpoint's own quantization_config (an FP8 checkpoint)
        refusal = moe_refusal(type(self).__name__, None if quant is None else "fp8", False)
        if refusal:
            raise ValueError(refusal)
        super().__init__(config, quant, tp)
