"""Gemma 3's config reading: each layer type's RoPE from every form of config (transformers 5's per-type
rope_parameters, the Hub's rope_theta / rope_local_base_freq / rope_scaling, transformers 4's attributes), and
what it refuses. Its outputs against transformers: tests/unit/test_models.py, tests/e2e/test_vs_transformers.py."""
import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import make_tiny_model
from pagedllm.engine.engine import _load_hf_config
from pagedllm.layers.rotary import rope_parameters
from pagedllm.models.loader import load_model

# gemma-3-4b-it's text config.json as on the Hub (the keys of transformers 4)
HUB_ROPE = {"rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
WANT = {"sliding_attention": ("default", 10_000.0, None), "full_attention": ("linear", 1_000_000.0, 8.0)}


def _rope(config, layer_type):
    params = rope_parameters(config, layer_type)
    return params["rope_type"], params["rope_theta"], params.get("factor")


def test_rotary_table_of_each_layer_type_is_transformers(tiny_model_dirs):
    """The fixture's sliding layers rotate with theta 100, its full one with theta 1e4 divided by 4 (linear):
    every layer's table is bit for bit transformers' of its type."""
    d = tiny_model_dirs["gemma3"]
    config = AutoConfig.from_pretrained(d)
    model = load_model(d, config, torch.float32, torch.device("cpu"))
    hf_rotary = AutoModelForCausalLM.from_config(config).model.rotary_emb
    positions = torch.arange(config.max_position_embeddings)[None]
    assert set(config.layer_types) == {"sliding_attention", "full_attention"}
    for layer, layer_type in zip(model.model.layers, config.layer_types):
        cos, sin = hf_rotary(torch.zeros(1), positions, layer_type)
        our_cos, our_sin = layer.self_attn.rotary_emb.cos_sin_cache.chunk(2, dim=-1)
        half = cos.shape[-1] // 2
        assert torch.equal(our_cos, cos[0, :, :half]) and torch.equal(our_sin, sin[0, :, :half])


def test_rope_of_each_layer_type_from_every_config_form(tmp_path):
    """The Hub's config.json (rope_theta, rope_local_base_freq, rope_scaling), the per-type rope_parameters
    transformers 5 turns it into and saves, and a transformers 4 config (which kept the Hub's attributes) give
    each layer type the same rotation: sliding theta 10k unscaled, full theta 1M linear by 8."""
    hub = make_tiny_model(tmp_path / "hub", "gemma3", rope_parameters=None)
    raw = json.loads((tmp_path / "hub" / "config.json").read_text())
    del raw["rope_parameters"]
    (tmp_path / "hub" / "config.json").write_text(json.dumps({**raw, **HUB_ROPE}))
    loaded = AutoConfig.from_pretrained(hub)
    loaded.save_pretrained(tmp_path / "v5")
    assert "rope_local_base_freq" not in json.loads((tmp_path / "v5" / "config.json").read_text())
    v4 = SimpleNamespace(**HUB_ROPE, layer_types=["sliding_attention", "full_attention"])
    for config in (loaded, AutoConfig.from_pretrained(tmp_path / "v5"), v4):
        assert {t: _rope(config, t) for t in WANT} == WANT
        assert _rope(config, None) == WANT["full_attention"]   # max_model_len's default reads the global layers'


def test_rope_theta_override_is_the_full_layers(tiny_model_dirs):
    """--hf-overrides rope_theta (vLLM's --rope-theta) on a config.json of transformers 5's form: the full
    layers' theta, as transformers reads a top-level rope_theta; it became every layer's, sliding ones too."""
    config = _load_hf_config(tiny_model_dirs["gemma3"], {"rope_theta": 5e5})
    assert _rope(config, "full_attention") == ("linear", 5e5, 4.0)
    assert _rope(config, "sliding_attention") == ("default", 100.0, None)


@pytest.mark.parametrize("field,value", [("use_bidirectional_attention", True), ("hidden_activation", "gelu")])
def test_refuses_what_it_does_not_compute(tmp_path, field, value):
    d = make_tiny_model(tmp_path / field, "gemma3", **{field: value})
    with pytest.raises(NotImplementedError, match=field):
        load_model(d, AutoConfig.from_pretrained(d), torch.float32, torch.device("cpu"))


def test_embedding_scale_is_transformers_in_each_dtype(tmp_path):
    """transformers multiplies the embeddings by sqrt(hidden_size) in the weights' dtype (96: 9.798 in float32,
    9.8125 in bfloat16), as Gemma 1's; the same factor here."""
    d = make_tiny_model(tmp_path / "g3", "gemma3", hidden_size=96)
    for dtype in (torch.float32, torch.bfloat16):
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=dtype).model.embed_tokens
        ours = load_model(d, AutoConfig.from_pretrained(d), dtype, torch.device("cpu")).model.embedding_multiplier
        assert ours == hf.embed_scale.to(hf.weight.dtype).item()
    assert ours != 96 ** 0.5
