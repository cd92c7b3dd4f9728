"""--speculative-config as vLLM 0.26 reads it (vllm/config/speculative.py): its spellings of the method, its other
keys taken where they ask for what runs here and refused naming them otherwise, its methods not built refused
saying why."""
import pytest

from pagedllm.spec_decode.config import SpeculativeConfig


def parse(**value) -> SpeculativeConfig:
    return SpeculativeConfig.parse({"num_speculative_tokens": 3, **value})


@pytest.mark.parametrize("value", [dict(model="[ngram]"), dict(model="ngram", prompt_lookup_max=4),
                                   dict(method="[ngram]"), dict(method="ngram", model="ngram")])
def test_vllms_spellings_of_ngram_are_ngram(value):
    """vLLM infers the method from model ("ngram", "[ngram]") and takes "[ngram]" as a method: all were refused."""
    spec = parse(**value)
    assert spec.method == "ngram" and spec.model is None
    assert spec.prompt_lookup_min == spec.prompt_lookup_max == value.get("prompt_lookup_max", 5)


def test_a_model_without_method_is_a_draft_model_as_vllms(tmp_path):
    spec = parse(model=str(tmp_path))
    assert (spec.method, spec.model) == ("draft_model", str(tmp_path))


@pytest.mark.parametrize("method, why", [("eagle", "hidden states"), ("eagle3", "hidden states"),
                                         ("medusa", "Medusa"), ("mtp", "multi-token"), ("deepseek_mtp", "multi-token"),
                                         ("suffix", "suffix decoding"), ("ngram_gpu", "GPU n-gram")])
def test_vllms_methods_not_built_are_refused_saying_why(method, why):
    with pytest.raises(ValueError, match=f"method '{method}' is not built \\(.*{why}"):
        parse(method=method, model="m")


@pytest.mark.parametrize("key, value", [("draft_tensor_parallel_size", 1), ("draft_tensor_parallel_size", None),
                                        ("disable_padded_drafter_batch", True), ("quantization", None),
                                        ("max_model_len", None), ("revision", None), ("code_revision", None),
                                        ("draft_sample_method", "greedy"), ("parallel_drafting", False),
                                        ("suffix_decoding_max_spec_factor", 1)])
def test_vllms_keys_that_ask_for_what_runs_here_are_taken(key, value):
    """They were refused as unknown keys."""
    assert parse(method="ngram", **{key: value}).method == "ngram"


@pytest.mark.parametrize("key, value, why", [
    ("max_model_len", 64, "max_model_len"),
    ("revision", "main", "local directory"), ("code_revision", "v1", "local directory"),
    ("draft_sample_method", "probabilistic", "greedily"), ("use_heterogeneous_vocab", True, "vocabulary"),
    ("tensor_parallel_size", 1, "draft_tensor_parallel_size"), ("enforce_eager", True, "enforce-eager")])
def test_vllms_keys_asking_for_what_is_not_built_are_refused_naming_them(key, value, why):
    with pytest.raises(ValueError, match=f"speculative_config: {key} must be one of .*, got {value!r}: .*{why}"):
        parse(method="ngram", **{key: value})


@pytest.mark.parametrize("tp, asked", [(1, 2), (2, 1), (2, 4)])
def test_draft_tensor_parallel_size_other_than_the_targets_is_refused_naming_it(tp, asked):
    """vLLM's default (the target's size: the draft sharded over its ranks) is what runs; 1 under a larger target
    is not built. Was refused at any value but 1, and tensor_parallel_size > 1 refused speculation at all."""
    spec = parse(method="ngram", draft_tensor_parallel_size=asked)
    with pytest.raises(ValueError, match=f"speculative_config: draft_tensor_parallel_size must be None or {tp} "
                                         f"\\(the target's tensor_parallel_size.*got {asked}"):
        spec.check_ranks(tp)
    parse(method="ngram", draft_tensor_parallel_size=tp).check_ranks(tp)
    parse(method="ngram").check_ranks(tp)


def test_draft_tensor_parallel_size_must_be_an_integer():
    with pytest.raises(ValueError, match="draft_tensor_parallel_size must be an integer or None, got True"):
        parse(method="ngram", draft_tensor_parallel_size=True)


def test_an_unknown_key_is_still_refused():
    with pytest.raises(ValueError, match="made of the keys .*got \\['bogus'\\]"):
        parse(method="ngram", bogus=1)


@pytest.mark.parametrize("length, rates", [(2.5, [1.0, 0.5, 0.0]), (1, [0.0, 0.0, 0.0]), (4, [1.0, 1.0, 1.0])])
def test_synthetic_acceptance_length_sets_vllms_rates(length, rates):
    """vLLM's synthetic_acceptance_length (mean accepted length, least-variance rates) was an unknown key."""
    spec = parse(method="ngram", rejection_sample_method="synthetic", synthetic_acceptance_length=length)
    assert spec.synthetic_acceptance_rates == rates


@pytest.mark.parametrize("extra", [dict(rejection_sample_method="synthetic", synthetic_acceptance_length=5),
                                   dict(synthetic_acceptance_length=2),
                                   dict(rejection_sample_method="synthetic", synthetic_acceptance_length=2,
                                        synthetic_acceptance_rates=[1.0, 1.0, 0.0])])
def test_a_synthetic_acceptance_length_out_of_place_is_refused_naming_it(extra):
    with pytest.raises(ValueError, match="synthetic_acceptance_length must be"):
        parse(method="ngram", **extra)
