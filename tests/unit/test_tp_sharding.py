"""Tensor-parallel sharding without processes: each rank's parameters are slices of the TP=1 model's (real
checkpoint and dummy weights), KV heads are replicated when there are fewer than ranks, and bad splits name
the field. Collectives are not called while a model is built and loaded, so TPGroup(rank, 2) needs no group."""
import pytest
import torch

from conftest import make_tiny_model
from pagedllm.distributed.layers import head_shard, vocab_rows
from pagedllm.distributed.parallel_state import TPGroup
from pagedllm.models.loader import load_model
from transformers import AutoConfig


def _rank_rows(full: torch.Tensor, parts: list[tuple[int, int]]) -> torch.Tensor:
    return torch.cat([full[a:b] for a, b in parts])


def _expected_qkv(full, cfg, rank: int, size: int) -> torch.Tensor:
    d = cfg.head_dim if getattr(cfg, "head_dim", None) else cfg.hidden_size // cfg.num_attention_heads
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    s = head_shard(hq, hkv, TPGroup(rank, size))
    q = (s.q_start * d, (s.q_start + s.num_heads) * d)
    k = (hq * d + s.kv_start * d, hq * d + (s.kv_start + s.num_kv_heads) * d)
    v = (k[0] + hkv * d, k[1] + hkv * d)
    return _rank_rows(full, [q, k, v])


@pytest.mark.parametrize("load_format", ["safetensors", "dummy"])
@pytest.mark.parametrize("kv_heads,tied", [(1, True), (2, False)])
def test_rank_parameters_are_slices_of_the_whole_model(tmp_path, load_format, kv_heads, tied):
    d = make_tiny_model(tmp_path / "m", "qwen2", num_key_value_heads=kv_heads, tie_word_embeddings=tied,
                        vocab_size=509)
    cfg = AutoConfig.from_pretrained(d)
    full = load_model(d, cfg, torch.float32, torch.device("cpu"), load_format)
    ranks = [load_model(d, cfg, torch.float32, torch.device("cpu"), load_format, tp=TPGroup(r, 2)) for r in (0, 1)]
    inter = cfg.intermediate_size // 2
    for r, m in enumerate(ranks):
        fa, ma = full.model.layers[1].self_attn, m.model.layers[1].self_attn
        assert torch.equal(ma.qkv_proj.weight, _expected_qkv(fa.qkv_proj.weight, cfg, r, 2))
        assert torch.equal(ma.qkv_proj.bias, _expected_qkv(fa.qkv_proj.bias, cfg, r, 2))
        q_cols = slice(r * fa.q_size // 2, (r + 1) * fa.q_size // 2)
        assert torch.equal(ma.o_proj.weight, fa.o_proj.weight[:, q_cols])
        fm, mm = full.model.layers[1].mlp, m.model.layers[1].mlp
        gate_up = _rank_rows(fm.gate_up_proj.weight, [(r * inter, (r + 1) * inter),
                                                      (cfg.intermediate_size + r * inter,
                                                       cfg.intermediate_size + (r + 1) * inter)])
        assert torch.equal(mm.gate_up_proj.weight, gate_up)
        assert torch.equal(mm.down_proj.weight, fm.down_proj.weight[:, r * inter:(r + 1) * inter])
        per, start, stop = vocab_rows(cfg.vocab_size, TPGroup(r, 2))
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            mine, whole = m.get_parameter(name), full.get_parameter(name)
            assert mine.shape[0] == per == 255
            assert torch.equal(mine[:stop - start], whole[start:stop])
            assert not mine[stop - start:].any()   # the last rank's padding row
        assert (m.lm_head.weight is m.model.embed_tokens.weight) == tied
        assert torch.equal(m.model.norm.weight, full.model.norm.weight)


def test_splits_that_do_not_divide_name_the_field():
    with pytest.raises(ValueError, match="num_attention_heads"):
        head_shard(6, 2, TPGroup(0, 4))
    with pytest.raises(ValueError, match="num_key_value_heads"):
        head_shard(12, 6, TPGroup(0, 4))
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        head_shard(8, 3, TPGroup(0, 4))   # 8 % 4 ok, but 4 ranks cannot share 3 KV heads
    s = head_shard(8, 2, TPGroup(3, 4))   # rank 3 of 4: query heads 6, 7 attend to KV head 1
    assert (s.num_heads, s.num_kv_heads, s.q_start, s.kv_start) == (2, 1, 6, 1)


def test_config_checks_tensor_parallel_size():
    from pagedllm.config import EngineConfig
    with pytest.raises(ValueError, match="tensor_parallel_size must be an integer >= 1"):
        EngineConfig(tensor_parallel_size=0)
    spec = EngineConfig(tensor_parallel_size=2, speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    assert spec.speculative_config["method"] == "ngram"
    kv_tiers = EngineConfig(tensor_parallel_size=2, kv_offloading_size=1.0, preemption_mode="swap")
    assert (kv_tiers.kv_offloading_size, kv_tiers.preemption_mode) == (1.0, "swap")
    assert EngineConfig(tensor_parallel_size=2, enable_lora=True).enable_lora
    assert EngineConfig(tensor_parallel_size=2).tensor_parallel_size == 2
    assert EngineConfig(tensor_parallel_size=2, quantization="fp8").quantization == "fp8"


def test_block_scales_split_by_whole_blocks_only():
    """A rank whose rows or columns cut a block of a block-quantized checkpoint is refused, naming the block
    size (vLLM refuses it too); the tensor's last, partial block may end a rank's share."""
    from types import SimpleNamespace

    from pagedllm.distributed.layers import checkpoint_slice
    cfg = SimpleNamespace(num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, vocab_size=512)
    name = "model.layers.0.self_attn.k_proj.weight_scale_inv"
    assert checkpoint_slice(name, (1, 2), cfg, 32, TPGroup(1, 2), (32, 32)) == (0, 1, 2)
    with pytest.raises(ValueError, match=r"rank 1 holds rows 16:32 of 32, not whole blocks of "
                                         r"quantization_config.weight_block_size \[32, 32\]"):
        checkpoint_slice(name, (1, 2), cfg, 16, TPGroup(1, 2), (32, 32))
    down = "model.layers.0.mlp.down_proj.weight_scale_inv"   # columns 48:96 of 96, blocks of 32: 48 cuts one
    with pytest.raises(ValueError, match="columns 48:96 of 96"):
        checkpoint_slice(down, (2, 3), cfg, 32, TPGroup(1, 2), (32, 32))
    assert checkpoint_slice(down, (2, 2), cfg, 32, TPGroup(1, 2), (32, 48)) == (1, 1, 2)   # 48:96, last partial
    assert checkpoint_slice(down.replace("_inv", ""), (64,), cfg, 32, TPGroup(1, 2)) is None   # per channel: whole
    assert checkpoint_slice("model.layers.0.mlp.up_proj.weight_scale", (96, 1), cfg, 32, TPGroup(1, 2)) == (0, 48, 96)
    assert checkpoint_slice("model.layers.0.mlp.up_proj.weight_scale", (1,), cfg, 32, TPGroup(1, 2)) is None
    assert checkpoint_slice("model.layers.0.self_attn.k_proj.input_scale", (), cfg, 32, TPGroup(1, 2)) is None
