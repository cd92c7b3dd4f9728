"""--hf-overrides (vLLM's): a JSON object over the model's config.json at load. It was refused at start."""
import json

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.config import EngineConfig
from pagedllm.engine.engine import resolve_model
from pagedllm.engine.hf_overrides import apply_hf_overrides
from pagedllm.runner.kv_disk import model_identity

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def _resolved(model_dir, overrides):
    return resolve_model(EngineConfig(model_dir, device="cpu", hf_overrides=overrides))


def test_max_position_embeddings_sets_the_default_max_model_len(tiny_model_dirs):
    assert _resolved(tiny_model_dirs["llama"], None).max_model_len == 512
    assert _resolved(tiny_model_dirs["llama"], '{"max_position_embeddings": 1024}').max_model_len == 1024
    with pytest.raises(ValueError, match=r"max_model_len \(2048\) must be at most the model's "
                                         r"max_position_embeddings \(1024\)"):
        resolve_model(EngineConfig(tiny_model_dirs["llama"], device="cpu", max_model_len=2048,
                                   hf_overrides={"max_position_embeddings": 1024}))


def test_a_rope_scaling_override_changes_what_the_engine_computes(tiny_model_dirs):
    """As JSON text (the CLI's form) and as a dict (LLM's); rope_scaling becomes transformers' rope_parameters."""
    prompt, params = [[5 + i % 300 for i in range(40)]], SamplingParams(max_tokens=1, prompt_logprobs=0)

    def prompt_logprobs(**kw):
        llm = LLM(tiny_model_dirs["llama"], device="cpu", dtype="float32", log_stats_interval=0, **kw)
        out = llm.generate(prompt, params, use_tqdm=False)[0]
        return llm.engine.hf_config, [next(iter(p.values())).logprob for p in out.prompt_logprobs[1:]]
    base_config, base = prompt_logprobs()
    config, scaled = prompt_logprobs(hf_overrides={"rope_scaling": LLAMA3})
    assert config.rope_parameters["rope_type"] == "llama3" and config.rope_parameters["factor"] == 8.0
    assert base_config.rope_parameters["rope_type"] == "default"
    assert not torch.allclose(torch.tensor(base), torch.tensor(scaled))
    _, again = prompt_logprobs(hf_overrides=json.dumps({"rope_scaling": LLAMA3}))
    assert again == scaled


@pytest.mark.parametrize("overrides", [{"rope_theta": 12345.0},
                                       {"rope_theta": 12345.0, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}],
                         ids=["theta", "theta+scaling"])
def test_a_rope_theta_override_reaches_rope_parameters(tiny_model_dirs, overrides):
    """transformers 5 writes config.json with rope_parameters (theta inside), which wins over a top-level
    rope_theta: the override must land there, not be dropped (vLLM's --rope-theta maps to this key)."""
    config = _resolved(tiny_model_dirs["llama"], overrides).hf_config
    assert config.rope_parameters["rope_theta"] == 12345.0
    assert config.rope_parameters["rope_type"] == overrides.get("rope_scaling", {}).get("rope_type", "default")


def test_a_dict_value_replaces_the_checkpoints_whole(tiny_model_dirs):
    """vLLM's rule: only sub-configs merge; llama3's factors do not survive an override of the rope type."""
    config = _resolved(tiny_model_dirs["llama3_rope"], {"rope_scaling": {"rope_type": "default"}}).hf_config
    assert config.rope_parameters["rope_type"] == "default" and "low_freq_factor" not in config.rope_parameters


def test_a_sub_config_merges_key_by_key():
    from transformers import LlavaConfig
    text = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 512}
    raw = {"model_type": "llava", "text_config": text, "image_token_index": 7}
    config = apply_hf_overrides(LlavaConfig.from_dict(raw), raw, {"text_config": {"max_position_embeddings": 99},
                                                                  "image_token_index": 9})
    assert (config.text_config.max_position_embeddings, config.text_config.hidden_size) == (99, 64)
    assert config.image_token_index == 9


@pytest.mark.parametrize("value, words", [
    ("{not json", "hf_overrides must be a JSON object: "),
    ('["max_position_embeddings"]', "hf_overrides must be a JSON object, got ['max_position_embeddings']"),
])
def test_what_is_not_an_object_is_refused_naming_the_field(value, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        EngineConfig(hf_overrides=value)


@pytest.mark.parametrize("overrides, words", [
    ({"num_hidden_layers": "x"}, "expected int, got str"),
    ({"num_attention_heads": 3}, "not a multiple of the number of attention heads"),
    ({"rope_scaling": 5}, "rope_parameters"),
])
def test_a_value_the_config_refuses_is_an_error_naming_the_flag(tiny_model_dirs, overrides, words):
    """transformers 5's config checks raise their own errors (not ValueError): `pagedllm serve` ended in a
    traceback instead of an error naming --hf-overrides."""
    with pytest.raises(ValueError, match=f"--hf-overrides .*the model's config does not take it: .*{words}"):
        _resolved(tiny_model_dirs["llama"], overrides)


def test_an_architecture_override_is_checked_as_the_checkpoints(tiny_model_dirs):
    with pytest.raises(ValueError, match="NopeForCausalLM"):
        _resolved(tiny_model_dirs["llama"], {"architectures": ["NopeForCausalLM"]})


def test_the_kv_disk_tier_tells_overridden_configs_apart(tiny_model_dirs):
    model_dir = tiny_model_dirs["llama"]
    config = _resolved(model_dir, None).hf_config
    base = model_identity(model_dir, config, torch.float32, 16, "dummy", "cpu")
    assert base == model_identity(model_dir, config, torch.float32, 16, "dummy", "cpu", hf_overrides={})
    assert base != model_identity(model_dir, config, torch.float32, 16, "dummy", "cpu",
                                  hf_overrides={"rope_scaling": LLAMA3})
