import re

import pytest

from pagedllm.sampling_params import SamplingParams

# (kwargs, field named in the message, the allowed range it must state)
INVALID = [
    (dict(n=0), "n", "an integer >= 1"),
    (dict(n=1.5), "n", "an integer >= 1"),
    (dict(temperature=-1), "temperature", "in [0, 2]"),
    (dict(temperature=float("nan")), "temperature", "in [0, 2]"),
    (dict(temperature=2.01), "temperature", "in [0, 2]"),   # vLLM's bound (OpenAI's) since 0.24
    (dict(top_p=0), "top_p", "in (0, 1]"),
    (dict(top_p=1.5), "top_p", "in (0, 1]"),
    (dict(top_k=-2), "top_k", "-1, 0 (all) or a positive integer"),
    (dict(top_k=2.5), "top_k", "-1, 0 (all) or a positive integer"),
    (dict(min_p=2), "min_p", "in [0, 1]"),
    (dict(min_p=-0.1), "min_p", "in [0, 1]"),
    (dict(seed=1.5), "seed", "an integer in [-2**63, 2**64) or None"),
    (dict(max_tokens=0), "max_tokens", "an integer >= 1 or None"),
    (dict(min_tokens=-1), "min_tokens", "an integer >= 0"),
    (dict(min_tokens=5, max_tokens=3), "min_tokens", "<= max_tokens (3)"),
    (dict(stop=[""]), "stop", "a list of non-empty strings"),
    (dict(stop=""), "stop", "a list of non-empty strings"),
    (dict(stop=["a", 3]), "stop", "a list of non-empty strings"),
    (dict(stop=["end"], detokenize=False), "stop", "empty when detokenize is False"),
    (dict(stop_token_ids=[-1]), "stop_token_ids", "a list of non-negative token ids"),
    (dict(logprobs=-2), "logprobs", "None, -1 (the vocabulary) or an integer >= 0"),
    (dict(prompt_logprobs=-2), "prompt_logprobs", "None, -1 (the vocabulary) or an integer >= 0"),
    # types a fuzz found taken or crashing (TypeError) before: no bool for an int, no scalar for a list
    (dict(stop=5), "stop", "a string, a list of strings or None"),
    (dict(stop={"a": 1}), "stop", "a string, a list of strings or None"),
    (dict(stop_token_ids=5), "stop_token_ids", "a list of token ids or None"),
    (dict(stop_token_ids=[True]), "stop_token_ids", "a list of non-negative token ids"),
    (dict(max_tokens=True), "max_tokens", "an integer >= 1 or None"),
    (dict(min_tokens=True), "min_tokens", "an integer >= 0"),
    (dict(logprobs=False), "logprobs", "None, -1 (the vocabulary) or an integer >= 0"),
    (dict(ignore_eos="no"), "ignore_eos", "True or False"),
    (dict(detokenize=1), "detokenize", "True or False"),
    # Beyond torch.Generator.manual_seed's range the engine core died ("Overflow when unpacking long long").
    (dict(seed=2**64), "seed", "an integer in [-2**63, 2**64) or None"),
    (dict(seed=-2**63 - 1), "seed", "an integer in [-2**63, 2**64) or None"),
    (dict(seed=2**70, temperature=0), "seed", "an integer in [-2**63, 2**64) or None"),
    (dict(top_k=True), "top_k", "-1, 0 (all) or a positive integer"),
    (dict(temperature=float("inf")), "temperature", "in [0, 2]"),
    (dict(temperature=1e309), "temperature", "in [0, 2]"),
    (dict(temperature=10**400), "temperature", "in [0, 2]"),
    (dict(top_p=float("nan")), "top_p", "in (0, 1]"),
    (dict(min_p=float("nan")), "min_p", "in [0, 1]"),
    (dict(presence_penalty=2.5), "presence_penalty", "in [-2, 2]"),
    (dict(presence_penalty=float("nan")), "presence_penalty", "in [-2, 2]"),
    (dict(frequency_penalty=-2.01), "frequency_penalty", "in [-2, 2]"),
    (dict(frequency_penalty=float("-inf")), "frequency_penalty", "in [-2, 2]"),
    (dict(repetition_penalty=0), "repetition_penalty", "a finite number > 0"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty", "a finite number > 0"),
    (dict(logit_bias={5: float("inf")}), "logit_bias", "a map of token ids to finite biases (or -inf)"),
    (dict(logit_bias={5: float("nan")}), "logit_bias", "a map of token ids to finite biases (or -inf)"),
    (dict(logit_bias={5: "1"}), "logit_bias", "a map of token ids to finite biases (or -inf)"),
    (dict(logit_bias={"abc": 1}), "logit_bias", "keyed by non-negative token ids"),
    (dict(logit_bias={-3: 1}), "logit_bias", "keyed by non-negative token ids"),
    (dict(logit_bias=[1, 2]), "logit_bias", "a map of token ids to finite biases (or -inf)"),
    (dict(allowed_token_ids=[]), "allowed_token_ids", "None or a non-empty list of non-negative token ids"),
    (dict(allowed_token_ids=[1, -1]), "allowed_token_ids", "None or a non-empty list of non-negative token ids"),
    (dict(bad_words=["ok", " "]), "bad_words", "a list of non-blank strings"),
    (dict(bad_words=[3]), "bad_words", "a list of non-blank strings"),
    (dict(bad_words="word"), "bad_words", "None or a list"),
    (dict(allowed_token_ids=5), "allowed_token_ids", "None or a list"),
    (dict(truncate_prompt_tokens=0), "truncate_prompt_tokens", "an integer >= 1, -1 (max_model_len) or None"),
    (dict(truncate_prompt_tokens=-2), "truncate_prompt_tokens", "an integer >= 1, -1 (max_model_len) or None"),
    (dict(truncation_side="middle"), "truncation_side", "None, left or right"),
    (dict(thinking_token_budget=-2), "thinking_token_budget", "None, -1 (unlimited) or an integer >= 0"),
    (dict(thinking_token_budget=1.5), "thinking_token_budget", "None, -1 (unlimited) or an integer >= 0"),
    (dict(logprob_token_ids=[1, -2]), "logprob_token_ids", "None or a list of non-negative token ids"),
    (dict(logprob_token_ids=5), "logprob_token_ids", "None or a list of non-negative token ids"),
    (dict(logprob_token_ids=list(range(129))), "logprob_token_ids", "at most 128 ids"),
    (dict(logprob_token_ids=[3, 4], logprobs=1), "logprobs",
     "None or the number of logprob_token_ids (2) when both are set"),
]


@pytest.mark.parametrize("kwargs, name, allowed", INVALID, ids=[str(k) for k, _, _ in INVALID])
def test_invalid_values_raise_naming_field_and_range(kwargs, name, allowed):
    with pytest.raises(ValueError, match=re.escape(f"SamplingParams.{name} must be {allowed}, got ")):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs, name, allowed", [
    (dict(stop_token_ids=[5, 512]), "stop_token_ids", "< vocab size 512"),
    (dict(logprobs=21), "logprobs", "<= max_logprobs (20)"),
    (dict(prompt_logprobs=100), "prompt_logprobs", "<= max_logprobs (20)"),
    (dict(logprobs=-1), "logprobs", "<= max_logprobs (20) (-1 is the vocabulary: 512 tokens)"),
    (dict(prompt_logprobs=-1), "prompt_logprobs", "<= max_logprobs (20) (-1 is the vocabulary: 512 tokens)"),
    (dict(allowed_token_ids=[3, 512]), "allowed_token_ids", "< vocab size 512"),
    (dict(logit_bias={"512": 1.0}), "logit_bias", "keyed by token ids < vocab size 512"),
    (dict(logprob_token_ids=[0, 512]), "logprob_token_ids", "token ids < vocab size 512"),
])
def test_validate_vocab_rejects_values_the_model_cannot_serve(kwargs, name, allowed):
    params = SamplingParams(**kwargs)
    with pytest.raises(ValueError, match=re.escape(f"SamplingParams.{name} must be {allowed}, got ")):
        params.validate_vocab(vocab_size=512, max_logprobs=20)


def test_validate_vocab_accepts_values_in_range():
    SamplingParams(stop_token_ids=[0, 511], logprobs=20, prompt_logprobs=0).validate_vocab(vocab_size=512,
                                                                                           max_logprobs=20)
    SamplingParams(logprobs=30).validate_vocab(vocab_size=512, max_logprobs=30)
    # vLLM's -1, the vocabulary: where the engine's bound is the vocabulary (--max-logprobs -1)
    SamplingParams(logprobs=-1, prompt_logprobs=-1).validate_vocab(vocab_size=512, max_logprobs=512)


def test_defaults_and_normalisation():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.max_tokens) == (1, 1.0, 1.0, 0, 0.0, 16)
    assert p.stop == [] and p.stop_token_ids == [] and not p.greedy
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(max_tokens=None, min_tokens=1000).min_tokens == 1000
    SamplingParams(top_p=1.0, min_p=1.0, min_tokens=3, max_tokens=3, logprobs=0, seed=0)


def test_seed_range_ends_and_new_field_defaults():
    for seed in (-2**63, 2**64 - 1, 0):
        assert SamplingParams(seed=seed).seed == seed
    p = SamplingParams()
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.logit_bias is p.allowed_token_ids is p.bad_words is p.truncate_prompt_tokens is None
    assert not p.uses_penalties and SamplingParams(repetition_penalty=1.1).uses_penalties


def test_temperature_below_one_hundredth_samples_at_one_hundredth_as_vllms():
    """vLLM raises a temperature in (0, 0.01) to 0.01 (smaller ones risk inf/NaN): only 0 is greedy."""
    for t in (1e-9, 1e-6, 0.005):
        p = SamplingParams(temperature=t)
        assert p.temperature == 0.01 and not p.greedy
    assert SamplingParams(temperature=0.02).temperature == 0.02
    assert SamplingParams(temperature=0.0).greedy


def test_seed_minus_one_is_no_seed_as_vllms():
    """vLLM takes seed -1 as unset (a random draw per request), as UIs send it; it was a fixed seed."""
    assert SamplingParams(seed=-1).seed is None
    assert SamplingParams(seed=-2).seed == -2


def test_logprob_token_ids_set_logprobs_to_their_number_past_the_top_n_bound():
    p = SamplingParams(logprob_token_ids=[7, 3, 7, 9])
    assert p.logprob_token_ids == [7, 3, 9] and p.logprobs == 3   # each id once, in the order given
    SamplingParams(logprob_token_ids=list(range(128))).validate_vocab(vocab_size=512, max_logprobs=20)   # > 20
    assert SamplingParams(logprob_token_ids=[]).logprob_token_ids is None   # vLLM's: none asked
    assert SamplingParams(logprob_token_ids=[4, 5], logprobs=2).logprobs == 2


def test_logit_bias_takes_json_string_keys():
    assert SamplingParams(logit_bias={"50": -100, 7: 2.5, "+3": 1}).logit_bias == {50: -100, 7: 2.5, 3: 1}


def test_error_echoes_long_values_cut_short():
    with pytest.raises(ValueError) as e:
        SamplingParams(stop=["x" * 100_000, ""])
    assert len(str(e.value)) < 400


def test_vllms_extra_fields_from_optional_and_clone():
    """A vLLM script's SamplingParams(spaces_between_special_tokens=False, extra_args={...}) is taken (they
    were unexpected-keyword TypeErrors); from_optional takes None as the default where vLLM's does."""
    p = SamplingParams(spaces_between_special_tokens=False, extra_args={"tag": 1})
    assert (p.spaces_between_special_tokens, p.extra_args) == (False, {"tag": 1})
    with pytest.raises(ValueError, match="extra_args must be None or a dict"):
        SamplingParams(extra_args=[1])
    p = SamplingParams.from_optional(n=None, temperature=None, top_p=None, repetition_penalty=None,
                                     max_tokens=None, stop="x")
    assert (p.n, p.temperature, p.top_p, p.repetition_penalty, p.max_tokens, p.stop) == (1, 1.0, 1.0, 1.0, None,
                                                                                          ["x"])
    q = p.clone()
    q.stop.append("y")
    assert q is not p and p.stop == ["x"]


def test_logprobs_true_is_one_as_vllms():
    """vLLM's __post_init__ takes logprobs / prompt_logprobs True as 1; it was a ValueError here."""
    p = SamplingParams(logprobs=True, prompt_logprobs=True)
    assert (p.logprobs, p.prompt_logprobs) == (1, 1) and type(p.logprobs) is int


def test_thinking_token_budget_minus_one_is_unlimited_as_vllms():
    """vLLM's validate_thinking_token_budget takes -1 as no budget (None); it was a ValueError here."""
    assert SamplingParams(thinking_token_budget=-1).thinking_token_budget is None
    assert SamplingParams(thinking_token_budget=0, reasoning_end_token_id=3).thinking_token_budget == 0


def test_logit_bias_is_taken_as_given_and_clamped_by_from_optional_as_vllms():
    """vLLM's SamplingParams adds each bias as given (-1e9 or -inf bans a token); its from_optional clamps each
    into [-100, 100]. A bias beyond 100 was a ValueError here, and from_optional did not clamp."""
    assert SamplingParams(logit_bias={5: -1e9, 6: 250, 7: float("-inf")}).logit_bias == {5: -1e9, 6: 250,
                                                                                         7: float("-inf")}
    assert SamplingParams.from_optional(logit_bias={"5": -1e9, 6: 250, 7: 3}).logit_bias == {5: -100, 6: 100, 7: 3}
    # infinities clamp as any number (the server's JSON 1e400 is +inf: it was refused while 1e300 was clamped)
    inf = float("inf")
    assert SamplingParams.from_optional(logit_bias={5: inf, 6: -inf}).logit_bias == {5: 100, 6: -100}
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams.from_optional(logit_bias={5: float("nan")})


def test_skip_clone_makes_clone_shallow_as_vllms():
    """vLLM 0.26's skip_clone field (an unexpected-keyword TypeError here): clone() is then a shallow copy."""
    p = SamplingParams(stop=["x"], skip_clone=True)
    q = p.clone()
    assert q is not p and q.stop is p.stop and q.skip_clone
    assert SamplingParams(stop=["x"]).clone().stop is not p.stop and not SamplingParams().skip_clone
    (dict(skip_clone=1), "skip_clone", "True or False"),


def test_n_is_bounded_by_vllms_max_n_sequences(monkeypatch):
    """vLLM refuses n above VLLM_MAX_N_SEQUENCES (16384 unless set); here any n was queued."""
    with pytest.raises(ValueError, match=re.escape("SamplingParams.n must be at most 16384 (raise the "
                                                   "VLLM_MAX_N_SEQUENCES environment variable for more), got 16385")):
        SamplingParams(n=16385)
    assert SamplingParams(n=16384).n == 16384
    monkeypatch.setenv("VLLM_MAX_N_SEQUENCES", "4")
    with pytest.raises(ValueError, match="SamplingParams.n must be at most 4 "):
        SamplingParams(n=5)


def test_sampling_type_and_num_logprobs_as_vllms():
    """vLLM's SamplingParams.sampling_type and num_logprobs properties (AttributeErrors here)."""
    from pagedllm.sampling_params import SamplingType
    assert SamplingParams(temperature=0, seed=3).sampling_type is SamplingType.GREEDY
    assert SamplingParams().sampling_type is SamplingType.RANDOM
    assert SamplingParams(seed=3).sampling_type is SamplingType.RANDOM_SEED
    assert SamplingParams(seed=-1).sampling_type is SamplingType.RANDOM
    assert SamplingParams().num_logprobs is None and SamplingParams(logprobs=-1).num_logprobs == -1
    assert SamplingParams(logprob_token_ids=[4, 9]).num_logprobs == 2


def test_logprobs_beside_logprob_token_ids_counts_them_as_given_as_vllms():
    """vLLM's verify: logprobs set beside logprob_token_ids equals the list's length as given. [7, 7, 9] with
    logprobs=3 was refused here (counted after repeats were dropped), and [] with logprobs=2 answered the top 2."""
    p = SamplingParams(logprob_token_ids=[7, 7, 9], logprobs=3)
    assert p.logprob_token_ids == [7, 9] and p.logprobs == 2
    for kwargs, n in ((dict(logprob_token_ids=[], logprobs=2), 0), (dict(logprob_token_ids=[7, 7, 9], logprobs=2), 3)):
        with pytest.raises(ValueError, match=re.escape(f"SamplingParams.logprobs must be None or the number of "
                                                       f"logprob_token_ids ({n}) when both are set")):
            SamplingParams(**kwargs)


def test_structured_outputs_whitespace_pattern_is_a_field_refused_when_set():
    """vLLM 0.26's StructuredOutputsParams has whitespace_pattern (an unexpected-keyword TypeError here): None is
    taken, a pattern refused naming it (xgrammar takes none), as the server's guided_whitespace_pattern is."""
    from pagedllm.structured_output.params import StructuredOutputsParams
    assert StructuredOutputsParams(regex="a+", whitespace_pattern=None).whitespace_pattern is None
    with pytest.raises(ValueError, match="structured_outputs.whitespace_pattern must be None"):
        StructuredOutputsParams(json_object=True, whitespace_pattern=r"[ ]?")
    with pytest.raises(ValueError, match="structured_outputs.whitespace_pattern must be None"):
        SamplingParams(structured_outputs={"json_object": True, "whitespace_pattern": " "})


def test_structured_outputs_json_object_false_is_refused_not_unset():
    """vLLM 0.26 counts json_object False as set: beside another constraint it is a second one (its
    __post_init__), and alone it is refused as the request is checked ("must be True if set; omit
    structured_outputs"). Here it was read as unset: taken beside a regex, and alone refused as "got none"."""
    from pagedllm.structured_output.params import StructuredOutputsParams
    with pytest.raises(ValueError, match="exactly one of .*; got regex, json_object"):
        StructuredOutputsParams(regex="a+", json_object=False)
    for make in (lambda: StructuredOutputsParams(json_object=False),
                 lambda: SamplingParams(structured_outputs={"json_object": False})):
        with pytest.raises(ValueError, match=re.escape("SamplingParams.structured_outputs.json_object must be True "
                                                       "if set; omit structured_outputs to have no constraint")):
            make()
    assert StructuredOutputsParams(json_object=True).kind == "json_object"


def test_routed_experts_prompt_start_is_taken():
    """vLLM 0.26's field (an unexpected-keyword TypeError here): it trims routing that only
    --enable-return-routed-experts returns, a flag refused here, so it is taken and checked."""
    assert SamplingParams(routed_experts_prompt_start=5).routed_experts_prompt_start == 5
    with pytest.raises(ValueError, match="SamplingParams.routed_experts_prompt_start must be an integer >= 0"):
        SamplingParams(routed_experts_prompt_start=-1)


def test_all_stop_token_ids_hold_the_stop_ids_from_the_start_as_vllms():
    """vLLM's __post_init__ puts stop_token_ids into all_stop_token_ids (the engine adds EOS); it was empty here
    until the engine filled it."""
    assert SamplingParams(stop_token_ids=[5, 9]).all_stop_token_ids == {5, 9}
    assert SamplingParams().all_stop_token_ids == set()


def test_fields_come_in_vllms_order():
    """vLLM's SamplingParams (a msgspec Struct) takes its fields by position too: SamplingParams(1, 0.5) is
    presence_penalty 0.5 there; here it was best_of. vLLM 0.26's public fields in its order, ours after them."""
    import dataclasses
    vllm = ("n presence_penalty frequency_penalty repetition_penalty temperature top_p top_k min_p seed stop "
            "stop_token_ids ignore_eos max_tokens min_tokens logprobs prompt_logprobs logprob_token_ids flat_logprobs "
            "detokenize skip_special_tokens spaces_between_special_tokens include_stop_str_in_output output_kind "
            "skip_clone").split()
    assert [f.name for f in dataclasses.fields(SamplingParams)][:len(vllm)] == vllm
    assert SamplingParams(1, 0.5).presence_penalty == 0.5
