"""Mixtral: Mistral whose every MLP is a sparse mixture of num_local_experts experts of intermediate_size, top
num_experts_per_tok, always renormalized. Its checkpoints name the MLP block_sparse_moe and an expert's linears
w1 (gate), w3 (up), w2 (down): renamed to Qwen-MoE's names on loading."""
from pagedllm.distributed.layers import split_size
from pagedllm.layers.moe import SparseMoeBlock
from pagedllm.models.moe_common import MoeForCausalLM


def mixtral_mlp(config, layer_idx: int, quant, prefix: str, tp):
    inter = split_size(config.intermediate_size, tp, "intermediate_size")   # this rank's share of each expert
    return SparseMoeBlock(config.hidden_size, config.num_local_experts, config.num_experts_per_tok, inter,
                          renormalize=True, tp=tp)


class MixtralForCausalLM(MoeForCausalLM):
    make_mlp = staticmethod(mixtral_mlp)
    weight_renames = ((r"\.block_sparse_moe\.", ".mlp."),
                      (r"(\.experts\.\d+)\.w1\.", r"\1.gate_proj."),
                      (r"(\.experts\.\d+)\.w3\.", r"\1.up_proj."),
                      (r"(\.experts\.\d+)\.w2\.", r"\1.down_proj."))
