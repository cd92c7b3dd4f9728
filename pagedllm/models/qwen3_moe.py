"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3 (per-head q/k norm) whose MLPs are sparse mixtures of
experts, except layers in mlp_only_layers or off the decoder_sparse_step grid, which keep a dense MLP of
intermediate_size. Router: softmax, top num_experts_per_tok, renormalized where norm_topk_prob."""
from pagedllm.distributed.layers import split_size
from pagedllm.layers.moe import SparseMoeBlock
from pagedllm.models.llama import LlamaMLP
from pagedllm.models.moe_common import MoeForCausalLM


def qwen3_moe_mlp(config, layer_idx: int, quant, prefix: str, tp):
    step = getattr(config, "decoder_sparse_step", 1) or 1
    sparse = (layer_idx not in (getattr(config, "mlp_only_layers", None) or [])
              and config.num_experts > 0 and (layer_idx + 1) % step == 0)
    if not sparse:
        return LlamaMLP(config, quant, prefix, tp)
    inter = split_size(config.moe_intermediate_size, tp, "moe_intermediate_size")   # this rank's share
    return SparseMoeBlock(config.hidden_size, config.num_experts, config.num_experts_per_tok, inter,
                          bool(getattr(config, "norm_topk_prob", False)), tp)


class Qwen3MoeForCausalLM(MoeForCausalLM):
    qk_norm = True
    make_mlp = staticmethod(qwen3_moe_mlp)
