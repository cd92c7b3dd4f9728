"""skip_tokenizer_init: a checkpoint with no tokenizer files runs on token-id prompts."""
import json
from pathlib import Path

import pytest
from conftest import TOKENIZER_FILES, make_tiny_model

from pagedllm import LLM, SamplingParams

PROMPTS = [[1, 17, 300, 42, 7], [1, 99, 5]]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny model with its tokenizer, and the same weights without one."""
    root = tmp_path_factory.mktemp("skip_tok")
    full = make_tiny_model(root / "full", seed=5)
    bare = make_tiny_model(root / "bare", seed=5)
    for name in TOKENIZER_FILES:
        (Path(bare) / name).unlink()
    return full, bare


def _llm(path, **kw):
    return LLM(path, max_model_len=64, log_stats_interval=0, device="cpu", **kw)


def test_token_ids_out_no_text(dirs):
    full, bare = dirs
    with pytest.raises(ValueError, match="no tokenizer in"):
        _llm(bare)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=1)
    ref = _llm(full).generate(PROMPTS, params, use_tqdm=False)
    out = _llm(bare, skip_tokenizer_init=True).generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in ref]
    assert [o.outputs[0].text for o in out] == ["", ""] and all(o.outputs[0].text for o in ref)
    assert all(lp.decoded_token is None for o in out for pos in o.outputs[0].logprobs for lp in pos.values())


def test_text_prompts_stop_strings_and_chat_are_errors(dirs):
    llm = _llm(dirs[1], skip_tokenizer_init=True)
    with pytest.raises(ValueError, match="prompt must be token ids when skip_tokenizer_init is set"):
        llm.generate("Once upon a time", use_tqdm=False)
    with pytest.raises(ValueError, match="stop must be empty when skip_tokenizer_init is set"):
        llm.generate(PROMPTS, SamplingParams(stop=["the"]), use_tqdm=False)
    # Both need the tokenizer: refused up front, not an AttributeError / a silent finish_reason "error"
    with pytest.raises(ValueError, match="bad_words must be empty when skip_tokenizer_init is set"):
        llm.generate(PROMPTS, SamplingParams(bad_words=["the"]), use_tqdm=False)
    with pytest.raises(ValueError, match="structured_outputs must be None when skip_tokenizer_init is set"):
        llm.generate(PROMPTS, SamplingParams(structured_outputs={"choice": ["yes", "no"]}), use_tqdm=False)
    with pytest.raises(ValueError, match="chat\\(\\) needs a tokenizer"):
        llm.chat([{"role": "user", "content": "hi"}])


def test_eos_ids_from_config_and_generation_config(dirs, tmp_path):
    full, bare = dirs
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    ids = _llm(full).generate(PROMPTS[:1], greedy, use_tqdm=False)[0].outputs[0].token_ids
    k = next(i for i in range(1, 8) if ids[i] not in ids[:i] and ids[i] != 2)   # a fresh id: the EOS to find
    (Path(bare) / "generation_config.json").write_text(json.dumps({"eos_token_id": [ids[k]]}))
    llm = _llm(bare, skip_tokenizer_init=True)
    assert llm.engine.input_processor.eos_token_ids == {2, ids[k]}   # config.json's 2, generation config's
    out = llm.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)[0].outputs[0]
    assert (out.token_ids, out.finish_reason) == (ids[:k + 1], "stop")


def test_serve_refuses_it(capsys):
    from pagedllm.cli import main
    assert main(["serve", "--skip-tokenizer-init"]) == 2
    assert capsys.readouterr().err.startswith("error: skip_tokenizer_init: pagedllm serve needs a tokenizer")
