"""generation_config.json sampling defaults (vLLM's --generation-config auto|vllm|DIR)."""
import json
import logging
import shutil

import pytest
from conftest import DEMO_DIR

from pagedllm import LLM, SamplingParams
from pagedllm.engine.generation_config import load_default_sampling_params
from pagedllm.server.protocol import CompletionRequest

GEN_CONFIG = {"bos_token_id": 1, "eos_token_id": 2, "do_sample": True, "temperature": 0.6, "top_p": 0.9,
              "top_k": 20, "min_p": None, "repetition_penalty": 1.1, "max_new_tokens": 7}


def _write(directory, values):
    directory.mkdir(exist_ok=True)
    (directory / "generation_config.json").write_text(json.dumps(values))
    return str(directory)


def test_auto_vllm_and_dir(tmp_path, caplog):
    model = _write(tmp_path / "model", GEN_CONFIG)
    other = _write(tmp_path / "other", {"temperature": 0.0, "min_p": 0.05})
    with caplog.at_level(logging.INFO, logger="pagedllm"):
        # max_new_tokens is vLLM's default max_tokens (get_diff_sampling_param)
        assert load_default_sampling_params(model, "auto") == {"temperature": 0.6, "top_p": 0.9, "top_k": 20,
                                                               "repetition_penalty": 1.1, "max_tokens": 7}
    assert "sampling defaults from" in caplog.text and "'temperature': 0.6" in caplog.text
    # vLLM's is a warning where the defaults come from a file (not with --generation-config vllm)
    assert [r.levelname for r in caplog.records if "sampling defaults from" in r.getMessage()] == ["WARNING"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pagedllm"):
        assert load_default_sampling_params(model, "vllm", {"temperature": 0.3}) == {"temperature": 0.3}
    assert [r.levelname for r in caplog.records if "sampling defaults from" in r.getMessage()] == ["INFO"]
    assert load_default_sampling_params(model, other) == {"temperature": 0.0, "min_p": 0.05}
    assert load_default_sampling_params(model, "vllm") == {}
    assert load_default_sampling_params(str(tmp_path), "auto") == {}   # no file: no defaults
    with pytest.raises(FileNotFoundError, match="generation_config .* has no generation_config.json"):
        load_default_sampling_params(model, str(tmp_path))
    # vLLM's: a directory with a config.json but no generation_config.json gives no defaults, and no error
    (tmp_path / "config.json").write_text('{"eos_token_id": 2, "temperature": 0.5}')
    assert load_default_sampling_params(model, str(tmp_path)) == {}


def test_demo_model_sets_no_sampling_defaults():
    # the CLI's generate (explicit --temperature 0.0 ...) and LLM() on the demo behave as before
    assert load_default_sampling_params(str(DEMO_DIR), "auto") == {}


@pytest.fixture(scope="module")
def greedy_by_default(tmp_path_factory):
    """The demo model with a generation config that makes sampling greedy (top_k 1), and temperature 0.5."""
    model = tmp_path_factory.mktemp("gen") / "demo"
    shutil.copytree(DEMO_DIR, model)
    _write(model, {"eos_token_id": [2, 1], "temperature": 0.5, "top_k": 1, "top_p": 0.8, "max_new_tokens": 5})
    return LLM(str(model), max_model_len=64, log_stats_interval=0, seed=3)


def test_llm_uses_the_defaults(greedy_by_default):
    llm = greedy_by_default
    assert llm.engine.default_sampling_params == {"temperature": 0.5, "top_k": 1, "top_p": 0.8, "max_tokens": 5}
    assert llm.get_default_sampling_params() == SamplingParams(temperature=0.5, top_k=1, top_p=0.8, max_tokens=5)
    prompts = ["Once upon a time", "The little dog"]
    greedy = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
    sampled = llm.generate(prompts, SamplingParams(temperature=1.0, max_tokens=16, seed=1), use_tqdm=False)
    default = llm.generate(prompts, use_tqdm=False)   # max_new_tokens (5) as max_tokens, and greedy by top_k 1
    assert [o.outputs[0].token_ids for o in default] == [o.outputs[0].token_ids[:5] for o in greedy]
    assert all(len(o.outputs[0].token_ids) == 5 for o in default)
    assert [o.outputs[0].token_ids for o in sampled] != [o.outputs[0].token_ids for o in greedy]


def test_vllm_ignores_the_file(tmp_path):
    model = tmp_path / "demo"
    shutil.copytree(DEMO_DIR, model)
    _write(model, {"temperature": 0.5, "top_k": 1})
    llm = LLM(str(model), generation_config="vllm", max_model_len=64, log_stats_interval=0)
    assert llm.engine.default_sampling_params == {}
    assert llm.get_default_sampling_params() == SamplingParams()


def test_server_request_fills_unset_fields_from_defaults():
    defaults = {"temperature": 0.5, "top_k": 1, "top_p": 0.8}
    unset = CompletionRequest(model="m", prompt="x").to_sampling_params(16, None, defaults=defaults)
    assert (unset.temperature, unset.top_k, unset.top_p, unset.min_p) == (0.5, 1, 0.8, 0.0)
    given = CompletionRequest(model="m", prompt="x", temperature=0.0, top_k=0).to_sampling_params(
        16, None, defaults=defaults)
    assert (given.temperature, given.top_k, given.top_p) == (0.0, 0, 0.8)
    assert CompletionRequest(model="m", prompt="x").to_sampling_params(16, None) == SamplingParams(max_tokens=16)


@pytest.mark.parametrize("text, words", [("{bad", "is not valid JSON"), ("[1]", "must hold a JSON object"),
                                         ('{"temperature": -5}', "SamplingParams.temperature must be")])
def test_a_bad_file_is_an_error_naming_it_at_load(tmp_path, text, words):
    """Not later, in the first request that takes the defaults (what a fuzz found)."""
    (tmp_path / "generation_config.json").write_text(text)
    with pytest.raises(ValueError, match=words) as e:
        load_default_sampling_params(str(tmp_path), "auto")
    assert str(tmp_path / "generation_config.json") in str(e.value)


def test_override_generation_config_as_vllm(tmp_path):
    """vLLM's --override-generation-config: a JSON object over the file's values (also with generation_config
    vllm); max_new_tokens is max_tokens there too."""
    from pagedllm.cli import main  # noqa: F401  (the flag is generated from the field)
    from pagedllm.config import EngineConfig
    model = _write(tmp_path / "model", GEN_CONFIG)
    override = EngineConfig(override_generation_config='{"temperature": 0.1, "max_new_tokens": 3}')
    assert override.override_generation_config == {"temperature": 0.1, "max_new_tokens": 3}
    assert load_default_sampling_params(model, "auto", override.override_generation_config) == {
        "temperature": 0.1, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1, "max_tokens": 3}
    assert load_default_sampling_params(model, "vllm", {"top_k": 5}) == {"top_k": 5}


@pytest.mark.parametrize("value, words", [
    ("{bad", "override_generation_config must be a JSON object"),
    ("[1]", "override_generation_config must be a JSON object"),
    ('{"temprature": 0.5}', "override_generation_config must be made of the keys .*max_new_tokens"),
])
def test_a_bad_override_names_the_field(value, words):
    from pagedllm.config import EngineConfig
    with pytest.raises(ValueError, match=words):
        EngineConfig(override_generation_config=value)


def test_override_generation_config_flag(tmp_path, capsys):
    from pagedllm.cli import main
    assert main(["generate", "--override-generation-config", '{"max_new_tokens": 0}', "--max-model-len", "64"]) == 2
    assert "generation_config" in capsys.readouterr().err


def test_generation_config_dir_names_the_eos_ids(tmp_path):
    """vLLM takes the generation config's eos_token_id (stop ids past the tokenizer's EOS, each its output's
    stop_reason) from the directory --generation-config names, not the model's."""
    model = tmp_path / "demo"
    shutil.copytree(DEMO_DIR, model)
    greedy = SamplingParams(temperature=0.0, max_tokens=10)
    llm = LLM(str(model), max_model_len=64, log_stats_interval=0)
    ids = llm.generate(["Once upon a time"], greedy, use_tqdm=False)[0].outputs[0].token_ids
    assert len(ids) == 10 and 2 not in ids
    other = _write(tmp_path / "other", {"eos_token_id": [2, ids[3]]})
    out = LLM(str(model), max_model_len=64, log_stats_interval=0, generation_config=other).generate(
        ["Once upon a time"], greedy, use_tqdm=False)[0].outputs[0]
    assert (out.token_ids, out.finish_reason, out.stop_reason) == (ids[:4], "stop", ids[3])
