"""Where requests enter: n bounded by SamplingParams alone, seeds of n children kept in manual_seed's range,
top_k above the vocabulary = all, truncate_prompt_tokens, bad words tokenized as vLLM does."""
from pathlib import Path

import pytest
import torch

from pagedllm import SamplingParams
from pagedllm.engine.input_processor import InputProcessor, truncate_prompt
from pagedllm.engine.tokenizer import load_tokenizer, num_added_tokens

DEMO = Path(__file__).resolve().parents[2] / "pagedllm" / "demo" / "stories260k"
PROMPT = list(range(3, 43))
LLAMA3 = Path("/work/shared/model-configs/meta-llama--Llama-3.1-8B-Instruct")
QWEN3 = Path("/work/shared/model-configs/Qwen--Qwen3-0.6B")


@pytest.fixture(scope="module")
def processor():
    return InputProcessor(load_tokenizer(str(DEMO)), {2}, vocab_size=512, max_model_len=64, block_size=16,
                          num_blocks=100, enable_prefix_caching=True, max_logprobs=20)


def test_n_is_bounded_by_sampling_params_alone():
    """vLLM's bound on n is VLLM_MAX_N_SEQUENCES (16384): an n above max_num_seqs runs, its sequences past the
    bound waiting for places (test_n_above_max_num_seqs_runs_as_with_room); it was refused here."""
    with pytest.raises(ValueError, match=r"n must be at most 16384"):
        SamplingParams(n=16385)


def test_children_seeds_wrap_into_the_generator_range(processor):
    children = processor.process("r", PROMPT, SamplingParams(n=3, seed=2**64 - 2, max_tokens=4)).core_requests
    seeds = [c.sampling_params.seed for c in children]
    assert seeds == [2**64 - 2, 2**64 - 1, 0]
    for s in seeds:
        torch.Generator().manual_seed(s)
    # Wrapping keeps the generator seed + i would give: negatives are taken modulo 2**64 by torch too.
    children = processor.process("r", PROMPT, SamplingParams(n=2, seed=-2**63, max_tokens=4)).core_requests
    a, b = (torch.Generator().manual_seed(s) for s in (-2**63 + 1, children[1].sampling_params.seed))
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


def test_top_k_above_the_vocabulary_means_all(processor):
    for k in (512, 2**63, 10**30):
        assert processor.process("r", PROMPT, SamplingParams(top_k=k, max_tokens=4)).params.top_k == 0
    assert processor.process("r", PROMPT, SamplingParams(top_k=511, max_tokens=4)).params.top_k == 511


def test_truncate_prompt_tokens_keeps_the_last_tokens_before_length_checks(processor):
    long_prompt = list(range(3, 103))      # 100 tokens: longer than max_model_len 64
    with pytest.raises(ValueError, match="max_model_len"):
        processor.process("r", long_prompt, SamplingParams(max_tokens=4))
    req = processor.process("r", long_prompt, SamplingParams(truncate_prompt_tokens=10, max_tokens=4))
    assert req.prompt_token_ids == long_prompt[-10:]
    assert req.core_requests[0].prompt_token_ids == long_prompt[-10:]
    req = processor.process("r", list(range(3, 50)), SamplingParams(truncate_prompt_tokens=-1, max_tokens=None))
    assert len(req.prompt_token_ids) == 47
    with pytest.raises(ValueError, match=r"truncate_prompt_tokens must be -1 or at most max_model_len \(64\)"):
        processor.process("r", PROMPT, SamplingParams(truncate_prompt_tokens=500))   # refused, as vLLM does
    # truncation_side right (vLLM's): the first k tokens
    req = processor.process("r", long_prompt, SamplingParams(truncate_prompt_tokens=10, truncation_side="right",
                                                             max_tokens=4))
    assert req.prompt_token_ids == req.core_requests[0].prompt_token_ids == long_prompt[:10]


@pytest.mark.parametrize("path", [
    DEMO,
    pytest.param(LLAMA3, marks=pytest.mark.skipif(not LLAMA3.is_dir(), reason="Llama-3.1 tokenizer files absent")),
    pytest.param(QWEN3, marks=pytest.mark.skipif(not QWEN3.is_dir(), reason="Qwen3 tokenizer files absent"))])
def test_truncated_text_keeps_the_special_tokens_the_tokenizer_added(path):
    """A text truncated as vLLM's server does it (the tokenizer's own truncation, side left): BOS, then the last
    k - 1 tokens of the text, not the last k tokens of BOS + text."""
    tok = load_tokenizer(str(path), truncation_side="left")
    text = "Once upon a time there was a little dog. It liked to play in the park with a red ball."
    ids = tok.encode(text)
    added = num_added_tokens(tok)
    assert added == ((1, 0) if path != QWEN3 else (0, 0))
    for k in (1, 2, 5, len(ids) - 1, len(ids), len(ids) + 3):
        assert truncate_prompt(ids, k, 1000, "left", added) == tok(text, truncation=True, max_length=k)["input_ids"]
    right = load_tokenizer(str(path), truncation_side="right")
    assert truncate_prompt(ids, 5, 1000, "right", added) == right(text, truncation=True, max_length=5)["input_ids"]
    assert truncate_prompt(ids, 5, 1000) == ids[-5:]   # token-id prompts: as given


def test_processor_truncates_a_text_after_its_bos(processor):
    tok = processor.tokenizer
    ids = tok.encode("Once upon a time there was a little dog")
    req = processor.process("r", "Once upon a time there was a little dog", SamplingParams(truncate_prompt_tokens=3,
                                                                                            max_tokens=4))
    assert req.prompt_token_ids == req.core_requests[0].prompt_token_ids == ids[:1] + ids[-2:]
    assert processor.process("r", ids, SamplingParams(truncate_prompt_tokens=3, max_tokens=4)).prompt_token_ids == \
        ids[-3:]


def test_bad_words_tokenized_alone_and_after_a_space(processor):
    tok = processor.tokenizer
    params = processor.process("r", PROMPT, SamplingParams(bad_words=["cat", " the dog"], max_tokens=4)).params
    expected = []
    for w in ("cat", "the dog"):
        alone, spaced = tok.encode(w, add_special_tokens=False), tok.encode(" " + w, add_special_tokens=False)
        expected.append(alone)
        if spaced[0] != alone[0] and len(spaced) == len(alone):
            expected.append(spaced)
    assert params.bad_words_token_ids == expected and len(expected[1]) > 1


class _SpaceMergingTokenizer:
    """A word-initial space merges into the first character's token (as in GPT-2's byte BPE)."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if text.startswith(" "):
            return [300 + ord(text[1]) % 200] + [ord(c) % 256 for c in text[2:]]
        return [ord(c) % 256 for c in text]


def test_bad_words_add_the_mid_text_form_when_a_space_changes_the_first_token():
    p = InputProcessor(_SpaceMergingTokenizer(), {2}, 512, 64, 16, 100, True, max_logprobs=20)
    params = p.process("r", PROMPT, SamplingParams(bad_words=["ab", "  c"], max_tokens=4)).params
    assert params.bad_words_token_ids == [[97, 98], [300 + 97, 98], [99], [300 + 99]]


def test_structured_outputs_config_options_reach_every_json_constraint():
    """vLLM's --structured-outputs-config '{"disable_any_whitespace": true}' (server-wide, as vLLM reads it) was
    refused at start-up; every request's JSON constraint now gets it (and disable_additional_properties), beside
    the request's own; other kinds are left as they are."""
    from pagedllm.config import EngineConfig
    from pagedllm.structured_output.params import StructuredOutputsParams
    config = EngineConfig(structured_outputs_config='{"backend": "xgrammar", "disable_any_whitespace": true}')
    assert config.structured_outputs_config == {"backend": "xgrammar", "disable_any_whitespace": True}
    p = InputProcessor(load_tokenizer(str(DEMO)), {2}, 512, 64, 16, 100, True, max_logprobs=20,
                       structured_outputs_config=config.structured_outputs_config)
    for so, compact in ((StructuredOutputsParams(json={"type": "object"}), True),
                        (StructuredOutputsParams(json_object=True), True),
                        (StructuredOutputsParams(regex="[ab]+"), False)):
        req = p.process("r", PROMPT, SamplingParams(max_tokens=4, structured_outputs=so))
        assert req.core_requests[0].sampling_params.structured_outputs.disable_any_whitespace is compact
    for bad, words in (({"backend": "guidance"}, "structured_outputs_config.backend must be auto or xgrammar"),
                       ({"enable_in_reasoning": True}, "enable_in_reasoning must be false"),
                       ({"whitespace": 1}, "made of the keys")):
        with pytest.raises(ValueError, match=words):
            EngineConfig(structured_outputs_config=bad)
