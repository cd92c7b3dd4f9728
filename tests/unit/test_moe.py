"""Mixture-of-experts layers (layers/moe.py) and models: routing, the grouped GEMM path against the per-expert
loop, both checkpoint layouts of the experts (whole, and each tensor-parallel rank's share), and the features
refused for MoE models."""
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from pagedllm import LLM
from pagedllm.distributed.parallel_state import TPGroup
from pagedllm.layers.moe import SparseMoeBlock, route
from pagedllm.layers.quantization.fp8_config import Fp8Config
from pagedllm.models.loader import load_model
from pagedllm.models.qwen3_moe import Qwen3MoeForCausalLM
from pagedllm.runner.model_runner import _num_layer_params

CPU = torch.device("cpu")


def _block(num_experts=6, top_k=2, hidden=16, inter=8, renormalize=True, seed=0):
    torch.manual_seed(seed)
    block = SparseMoeBlock(hidden, num_experts, top_k, inter, renormalize)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return block


def _dense_reference(block: SparseMoeBlock, x: torch.Tensor) -> torch.Tensor:
    """Each token through each of its experts, one at a time."""
    weights, ids = route(block.gate(x), block.top_k, block.renormalize)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for w, e in zip(weights[t], ids[t]):
            gate, up = torch.nn.functional.linear(x[t], block.experts.gate_up_proj[e]).chunk(2)
            out[t] += w * torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, block.experts.down_proj[e])
    return out


@pytest.mark.parametrize("renormalize", [True, False])
def test_route_is_softmax_top_k(renormalize):
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 4.0]])
    weights, ids = route(logits, 2, renormalize)
    probs = logits.softmax(-1)
    assert ids.tolist() == [[1, 2], [2, 3]]
    expect = probs.gather(1, ids)
    if renormalize:
        expect = expect / expect.sum(-1, keepdim=True)
    torch.testing.assert_close(weights, expect)


def test_block_matches_per_token_reference():
    block = _block()
    x = torch.randn(13, 16)
    torch.testing.assert_close(block(x), _dense_reference(block, x), rtol=1e-5, atol=1e-5)


def test_grouped_gemms_match_the_expert_loop():
    """The GPU path's arithmetic (torch._grouped_mm with offsets; the CPU torch runs it too) equals the loop,
    with experts that get no rows in the middle and at both ends."""
    experts = _block(num_experts=6).experts
    rows = torch.randn(9, 16)
    sorted_ids = torch.tensor([1, 1, 2, 2, 2, 3, 4, 4, 4])     # experts 0 and 5 idle
    torch.testing.assert_close(experts._grouped(rows, sorted_ids), experts._looped(rows, sorted_ids),
                               rtol=1e-5, atol=1e-5)


def test_experts_take_the_loop_on_cpu():
    experts = _block().experts
    assert not experts.uses_grouped_mm(torch.zeros(1, 16)) and not experts.graph_safe(CPU)


def test_grouped_path_asks_the_device_once(monkeypatch):
    """Each MoE layer checks graph_safe every step: the device's capability is read once, and the expert ids the
    offsets are searched with are a buffer made with the layer (no arange a step; static inside a graph), not
    saved with the weights."""
    from pagedllm.layers import moe
    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: calls.append(index) or (9, 0))
    moe._capability_major.cache_clear()
    experts = _block(hidden=16, inter=8).experts.to(torch.bfloat16)
    try:
        assert all(experts.graph_safe(torch.device("cuda", 0)) for _ in range(3)) and calls == [0]
    finally:
        moe._capability_major.cache_clear()
    assert experts.expert_ids.tolist() == list(range(6)) and "expert_ids" not in experts.state_dict()


def test_top_k_out_of_range_is_refused():
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        SparseMoeBlock(16, 4, 5, 8, True)


def _fuse_experts(model_dir, out_dir):
    """transformers 5's in-memory layout as a checkpoint: experts.gate_up_proj (E, 2I, C), experts.down_proj."""
    tensors = load_file(f"{model_dir}/model.safetensors")
    fused = {k: v for k, v in tensors.items() if ".experts." not in k}
    for layer in range(2):
        p = f"model.layers.{layer}.mlp.experts"
        n = sum(1 for k in tensors if k.startswith(p) and k.endswith("down_proj.weight"))
        if n:
            fused[f"{p}.gate_up_proj"] = torch.stack([torch.cat([tensors[f"{p}.{e}.{proj}.weight"] for proj in
                                                                 ("gate_proj", "up_proj")]) for e in range(n)])
            fused[f"{p}.down_proj"] = torch.stack([tensors[f"{p}.{e}.down_proj.weight"] for e in range(n)])
    out_dir.mkdir()
    save_file(fused, str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text(open(f"{model_dir}/config.json").read())
    return str(out_dir)


def test_fused_and_per_expert_checkpoints_load_the_same(tiny_model_dirs, tmp_path):
    d = tiny_model_dirs["qwen3_moe"]
    per_expert = load_model(d, AutoConfig.from_pretrained(d), torch.float32, CPU)
    fused_dir = _fuse_experts(d, tmp_path / "fused")
    fused = load_model(fused_dir, AutoConfig.from_pretrained(fused_dir), torch.float32, CPU)
    for (name, a), (_, b) in zip(per_expert.named_parameters(), fused.named_parameters()):
        assert torch.equal(a, b), name
    assert isinstance(per_expert.model.layers[0].mlp, SparseMoeBlock)
    assert not isinstance(per_expert.model.layers[1].mlp, SparseMoeBlock)    # mlp_only_layers = [1]


def test_tp_ranks_load_their_share_of_every_expert(tiny_model_dirs, tmp_path):
    """At TP=2 each rank holds every expert's gate and up rows and down columns of its half of
    moe_intermediate_size (not the dense layer's intermediate_size), from per-expert and stacked checkpoints
    alike, and the whole router."""
    d = tiny_model_dirs["qwen3_moe"]
    config = AutoConfig.from_pretrained(d)
    whole = load_model(d, config, torch.float32, CPU).model.layers[0].mlp
    full = whole.experts.intermediate_size
    stacked = _fuse_experts(d, tmp_path / "fused")
    for rank in range(2):
        rows = slice(rank * full // 2, (rank + 1) * full // 2)
        gate_up = torch.cat([whole.experts.gate_up_proj[:, :full][:, rows],
                             whole.experts.gate_up_proj[:, full:][:, rows]], dim=1)
        for src in (d, stacked):
            mlp = load_model(src, config, torch.float32, CPU, tp=TPGroup(rank=rank, size=2)).model.layers[0].mlp
            assert torch.equal(mlp.experts.gate_up_proj, gate_up)
            assert torch.equal(mlp.experts.down_proj, whole.experts.down_proj[:, :, rows])
            assert torch.equal(mlp.gate.weight, whole.gate.weight)


def test_missing_expert_is_named(tiny_model_dirs):
    d = tiny_model_dirs["mixtral"]
    model = load_model(d, AutoConfig.from_pretrained(d), torch.float32, CPU, load_format="dummy")
    tensors = load_file(f"{d}/model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.3.w3.weight"]
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight"):
        model.load_weights(tensors.items())
    tensors["model.layers.1.block_sparse_moe.experts.9.w3.weight"] = torch.zeros(128, 64)
    with pytest.raises(ValueError, match="unexpected weight"):
        model.load_weights(tensors.items())


@pytest.mark.parametrize("kwargs,field", [(dict(quantization="fp8"), "quantization='fp8'"),
                                          (dict(enable_lora=True), "enable_lora=True")])
@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_features_without_an_expert_path_are_refused(tiny_model_dirs, name, kwargs, field):
    with pytest.raises(ValueError, match=f"{field} is not supported for .*mixture of experts"):
        LLM(tiny_model_dirs[name], dtype="float32", log_stats_interval=0, **kwargs)


def test_fp8_checkpoint_of_a_moe_model_is_refused(tiny_model_dirs):
    """A checkpoint's own quantization_config reaches the model as quant, not as --quantization."""
    config = AutoConfig.from_pretrained(tiny_model_dirs["qwen3_moe"])
    with pytest.raises(ValueError, match="quantization='fp8' is not supported for Qwen3MoeForCausalLM"):
        Qwen3MoeForCausalLM(config, Fp8Config())


def test_graph_cap_counts_the_experts_a_token_uses(tiny_model_dirs):
    d = tiny_model_dirs["qwen3_moe"]
    model = load_model(d, AutoConfig.from_pretrained(d), torch.float32, CPU, load_format="dummy")
    experts = model.model.layers[0].mlp.experts
    everything = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)
    assert _num_layer_params(model) == everything - experts.gate_up_proj.numel() * 6 // 8 \
        - experts.down_proj.numel() * 6 // 8     # top 2 of 8


def test_experts_off_the_grouped_path_turn_cuda_graphs_off(tiny_model_dirs, caplog):
    """float32 experts would loop on a GPU too (reading counts on the host): the runner must not capture them."""
    from pagedllm.runner.model_runner import _graphs_blocked
    d = tiny_model_dirs["qwen3_moe"]
    model = load_model(d, AutoConfig.from_pretrained(d), torch.float32, CPU, load_format="dummy")
    assert _graphs_blocked(model, torch.device("cuda"))
    assert "CUDA graphs off" in caplog.text and "torch.float32" in caplog.text
    dense = load_model(tiny_model_dirs["qwen3"], AutoConfig.from_pretrained(tiny_model_dirs["qwen3"]), torch.float32,
                       CPU, load_format="dummy")
    assert not _graphs_blocked(dense, torch.device("cuda"))
