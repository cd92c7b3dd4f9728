import os
import random

import pytest

from pagedllm.engine.detokenizer import IncrementalDetokenizer
from pagedllm.engine.tokenizer import load_eos_token_ids, load_tokenizer, raw_decoder
from pagedllm.sampling_params import SamplingParams

DEMO = os.path.join(os.path.dirname(__file__), "..", "..", "pagedllm", "demo", "stories260k")
QWEN = "/work/shared/model-configs/Qwen--Qwen3-0.6B"

TOKENIZERS = [
    pytest.param(DEMO, id="sentencepiece-bytefallback"),
    pytest.param(QWEN, id="byte-level-bpe",
                 marks=pytest.mark.skipif(not os.path.isdir(QWEN), reason="Qwen3 tokenizer files absent")),
]

TEXTS = [
    "Once upon a time there was a little dog. It liked to play in the park.",
    "héllo 日本語 🙂 world, naïve café — ½ ∑ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢!",
    "  two  spaces, a\ttab and a\nnewline; then 🙂🙂🙂 and 中文字符 at the end 日",
]


@pytest.fixture(scope="module", params=TOKENIZERS)
def tok(request):
    return load_tokenizer(request.param)


def encode(tok, text: str) -> list[int]:
    return tok.encode(text)  # with BOS where the tokenizer adds one, as a real prompt would have


_SINGLE_TEXTS = {}   # one-token window texts shared by every stream of a tokenizer, as OutputProcessor shares them


def stream(tok, prompt_ids, output_ids, chunk=1, **params):
    """Feed output ids `chunk` at a time like the engine; return (detokenizer, deltas, stop string)."""
    singles = _SINGLE_TEXTS.setdefault((id(tok), params.get("skip_special_tokens", True)), {})
    d = IncrementalDetokenizer(tok, prompt_ids, SamplingParams(max_tokens=None, **params), singles)
    deltas, stop = [], None
    for i in range(0, len(output_ids), chunk):
        new = output_ids[i:i + chunk]
        stop = d.update(new, i + len(new))
        deltas.append(d.get_next_output_text(finished=stop is not None, delta=True))
        if stop is not None:
            break
    deltas.append(d.get_next_output_text(finished=True, delta=True))
    assert "".join(deltas) == d.output_text == d.get_next_output_text(finished=True, delta=False)
    return d, deltas, stop


def reference(tok, prompt_ids, output_ids) -> str:
    full = tok.decode(prompt_ids + output_ids, skip_special_tokens=True)
    return full[len(tok.decode(prompt_ids, skip_special_tokens=True)):]


def clean_cuts(tok, ids):
    """Prompt/output split points where the prompt decodes to whole characters."""
    return [k for k in range(1, len(ids)) if "\ufffd" not in tok.decode(ids[:k], skip_special_tokens=True)]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_streamed_text_equals_full_decode(tok, text, chunk):
    ids = encode(tok, text)
    for k in clean_cuts(tok, ids)[::3]:
        d, deltas, _ = stream(tok, ids[:k], ids[k:], chunk=chunk)
        assert d.output_text == reference(tok, ids[:k], ids[k:]), (k, d.output_text)
        assert not any("\ufffd" in x for x in deltas)


def test_first_output_token_keeps_its_leading_space(tok):
    prompt, output = encode(tok, "Once upon a"), encode(tok, "Once upon a time")[len(encode(tok, "Once upon a")):]
    d, deltas, _ = stream(tok, prompt, output)
    assert d.output_text == " time" and deltas[0].startswith(" ")


def test_random_text_round_trips(tok):
    """Random strings over an alphabet rich in multi-byte characters, encoded then streamed."""
    rng = random.Random(0)
    alphabet = list("abc xyz.,é日本語中🙂😀∑ñ\n") + [" the", " dog", "ing"]
    for _ in range(30):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        prompt = encode(tok, "Story:")
        output = encode(tok, "Story:" + text)[len(prompt):]
        if tok.decode(prompt + output, skip_special_tokens=True) != "Story:" + text:
            continue  # the tokenizer normalised the joint text; not a detokenizer question
        d, deltas, _ = stream(tok, prompt, output, chunk=rng.randint(1, 4))
        assert d.output_text == reference(tok, prompt, output)
        assert not any("\ufffd" in x for x in deltas)


def test_random_token_ids_stream_consistently(tok):
    """Arbitrary ids (invalid byte runs, special tokens, ids past the tokenizer): deltas still add up, and
    no delta ends inside a character that a later token completes."""
    rng = random.Random(1)
    vocab = len(tok)
    for _ in range(30):
        output = [rng.randrange(vocab + 16) for _ in range(rng.randint(1, 30))]
        d, deltas, _ = stream(tok, encode(tok, "Hello"), output, chunk=rng.randint(1, 3))
        if "\ufffd" not in reference(tok, encode(tok, "Hello"), output):
            assert not any("\ufffd" in x for x in deltas)


def test_multibyte_character_is_held_until_complete():
    tok = load_tokenizer(DEMO)
    prompt = encode(tok, "Hi")
    output = encode(tok, "Hi 🙂")[len(prompt):]
    assert len(output) >= 4  # " " then the emoji's four byte tokens (byte fallback)
    d, deltas, _ = stream(tok, prompt, output)
    assert deltas[:-1] == [" ", "", "", "", "🙂"]


def test_special_tokens_follow_skip_special_tokens():
    tok = load_tokenizer(DEMO)
    prompt, eos = encode(tok, "Once upon"), tok.eos_token_id
    output = encode(tok, "Once upon a time")[len(prompt):] + [eos]
    assert stream(tok, prompt, output)[0].output_text == " a time"
    assert stream(tok, prompt, output, skip_special_tokens=False)[0].output_text == " a time" + tok.eos_token


@pytest.mark.parametrize("include", [False, True])
def test_stop_token_text_is_left_out_unless_included(include):
    tok = load_tokenizer(DEMO)
    prompt = encode(tok, "Once upon")
    output = encode(tok, "Once upon a time.")[len(prompt):]  # "." plays a (non-special) stop token id
    d = IncrementalDetokenizer(tok, prompt, SamplingParams(stop_token_ids=[output[-1]],
                                                           include_stop_str_in_output=include))
    assert d.update(output, len(output), stop_terminated=True) is None
    assert d.output_text == (" a time." if include else " a time")


def test_detokenize_false_does_nothing():
    tok = load_tokenizer(DEMO)
    d = IncrementalDetokenizer(tok, encode(tok, "Hi"), SamplingParams(detokenize=False))
    assert d.update(encode(tok, "Hi there")[1:], 2) is None
    assert d.output_text == "" and d.get_next_output_text(finished=True, delta=True) == ""


# ---- stop strings -----------------------------------------------------------------------------------------

STORY = "Once upon a time there was a cat. The cat sat on the mat. The end."


def story_split(tok):
    prompt = encode(tok, "Once")
    return prompt, encode(tok, STORY)[len(prompt):]


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("chunk", [1, 4])
def test_stop_string_across_token_boundaries_is_trimmed(tok, include, chunk):
    prompt, output = story_split(tok)
    stop = "cat sat"  # spans several tokens
    d, deltas, matched = stream(tok, prompt, output, chunk=chunk, stop=["zebra", stop],
                                include_stop_str_in_output=include)
    assert matched == stop
    expected = " upon a time there was a cat. The " + (stop if include else "")
    assert d.output_text == expected
    assert "".join(deltas) == expected  # nothing past the cut was ever streamed


def test_partial_stop_string_is_held_back(tok):
    prompt, output = story_split(tok)
    d = IncrementalDetokenizer(tok, prompt, SamplingParams(stop=["The end", "mat"], max_tokens=None))
    streamed = ""
    for i, t in enumerate(output):
        if d.update([t], i + 1) is not None:
            break
        streamed += d.get_next_output_text(finished=False, delta=True)
        # The last len("The end") - 1 = 6 characters stay back: they could start a stop string.
        assert streamed == d.output_text[:max(len(d.output_text) - 6, 0)]
        assert d.get_next_output_text(finished=False, delta=False) == streamed
    assert d.output_text == " upon a time there was a cat. The cat sat on the "
    streamed += d.get_next_output_text(finished=True, delta=True)
    assert streamed == d.output_text


def test_no_hold_back_without_stop_strings_or_when_included(tok):
    prompt, output = story_split(tok)
    for params in (dict(), dict(stop=["zebra"], include_stop_str_in_output=True)):
        d = IncrementalDetokenizer(tok, prompt, SamplingParams(max_tokens=None, **params))
        d.update(output[:5], 5)
        assert d.get_next_output_text(finished=False, delta=True) == d.output_text != ""


def test_earliest_ending_stop_string_wins(tok):
    prompt, output = story_split(tok)
    d, _, matched = stream(tok, prompt, output, chunk=len(output), stop=["there was a cat", "time"])
    assert matched == "time" and d.output_text == " upon a "


def test_min_tokens_delays_stop_strings(tok):
    prompt, output = story_split(tok)
    text_after = [reference(tok, prompt, output[:n]) for n in range(len(output) + 1)]
    first_end = next(n for n, t in enumerate(text_after) if "The" in t)  # token that completes the first "The"
    # Checked after min_tokens (vLLM's, as for EOS: min_tokens tokens come before the one that stops): a "The"
    # completed by token number first_end counts when min_tokens < first_end.
    d, _, matched = stream(tok, prompt, output, stop=["The"], min_tokens=first_end - 1)
    assert matched == "The" and d.output_text == " upon a time there was a cat. "
    # One later and the first "The" is ignored; the second one stops.
    d, _, matched = stream(tok, prompt, output, stop=["The"], min_tokens=first_end)
    assert matched == "The" and d.output_text == " upon a time there was a cat. The cat sat on the mat. "
    # The same holds when the tokens arrive in one update.
    d, _, matched = stream(tok, prompt, output, chunk=len(output), stop=["The"], min_tokens=first_end)
    assert d.output_text == " upon a time there was a cat. The cat sat on the mat. "


def test_ids_that_come_together_are_kept_up_to_the_stop_string(tok):
    """Several ids in one update (speculative decoding): tokens_to_stop is how many of them plain decoding
    would have output, the one that completed the stop string included."""
    prompt, output = story_split(tok)
    ends_at = next(n for n in range(len(output) + 1) if "cat sat" in reference(tok, prompt, output[:n]))
    for first in (0, ends_at - 2):   # the update holds the whole output, or starts two ids before the end
        d = IncrementalDetokenizer(tok, prompt, SamplingParams(stop=["cat sat"], max_tokens=None))
        d.update(output[:first], first)
        assert d.update(output[first:], len(output)) == "cat sat"
        assert d.tokens_to_stop == ends_at - first


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_raw_decoder_matches_the_tokenizers_decode(tok, skip_special_tokens):
    """The detokenizer's direct Rust decode gives what tokenizer.decode gives, special tokens, invalid byte
    runs and all; these tokenizers do take the direct path."""
    decode = raw_decoder(tok, skip_special_tokens)
    assert decode.func == tok._tokenizer.decode
    rng = random.Random(2)
    special = list(tok.all_special_ids)
    for _ in range(300):
        ids = [rng.choice(special) if rng.random() < 0.1 else rng.randrange(len(tok))
               for _ in range(rng.randint(0, 8))]
        assert decode(ids) == tok.decode(ids, skip_special_tokens=skip_special_tokens,
                                         clean_up_tokenization_spaces=False)


def test_raw_decoder_keeps_an_overridden_decode():
    class Shouting(type(load_tokenizer(DEMO))):
        def decode(self, ids, **kwargs):
            return super().decode(ids, **kwargs).upper()
    tok = load_tokenizer(DEMO)
    tok.__class__ = Shouting
    ids = encode(tok, "Once upon a time")
    assert raw_decoder(tok, True)(ids) == "ONCE UPON A TIME"


# ---- tokenizer loading --------------------------------------------------------------------------------------

def test_load_tokenizer_names_the_missing_files(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer in .*tokenizer.json"):
        load_tokenizer(str(tmp_path))


def test_eos_ids_merge_tokenizer_and_generation_config(tmp_path):
    tok = load_tokenizer(DEMO)
    assert load_eos_token_ids(DEMO, tok) == {1, 2}  # generation_config.json lists [2, 1]
    assert load_eos_token_ids(str(tmp_path), tok) == {2}  # no generation config: the tokenizer's EOS
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": 7}')
    assert load_eos_token_ids(str(tmp_path), tok) == {2, 7}
    if os.path.isdir(QWEN):
        assert load_eos_token_ids(QWEN, load_tokenizer(QWEN)) == {151645, 151643}



def test_eos_ids_of_the_generation_config_vllm_reads(tmp_path):
    """vLLM's try_get_generation_config: without generation_config.json, config.json's eos_token_id (its
    text_config's when it has none at the top) stands in for it; --generation-config DIR reads DIR's, where
    auto and vllm read the model directory's."""
    tok = load_tokenizer(DEMO)   # its EOS: 2
    model, other = tmp_path / "model", tmp_path / "other"
    model.mkdir(), other.mkdir()
    (model / "config.json").write_text('{"eos_token_id": [2, 5]}')
    assert load_eos_token_ids(str(model), tok) == {2, 5}
    (model / "config.json").write_text('{"text_config": {"eos_token_id": 6}}')
    assert load_eos_token_ids(str(model), tok) == {2, 6}
    (model / "generation_config.json").write_text('{"eos_token_id": 7}')
    assert load_eos_token_ids(str(model), tok) == {2, 7}   # the file wins over config.json
    (other / "generation_config.json").write_text('{"eos_token_id": [8, 2]}')
    assert load_eos_token_ids(str(model), tok, str(other)) == {2, 8}
    assert load_eos_token_ids(str(model), tok, "vllm") == {2, 7}

SHARED_CONFIGS = "/work/shared/model-configs"
MORE_TOKENIZERS = [pytest.param(os.path.join(SHARED_CONFIGS, name), id=name,
                                marks=pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_CONFIGS, name)),
                                                         reason="tokenizer files absent"))
                   for name in ("meta-llama--Llama-3.1-8B-Instruct", "mistralai--Mistral-7B-v0.1")]


@pytest.mark.parametrize("path", TOKENIZERS + MORE_TOKENIZERS)
def test_deferred_text_equals_the_windows(path):
    """A FINAL request decodes its ids once at the end (deferred): the same text as the windows give token by
    token, for text that round-trips and for arbitrary ids (invalid byte runs, special tokens, ids past the
    tokenizer, an incomplete character at the end), with and without special tokens and a stop token id."""
    tok = load_tokenizer(path)
    rng = random.Random(2)
    vocab = len(tok)
    byte_ids = [i for i in range(min(vocab, 400)) if "\ufffd" in tok.decode([i])] or [0]
    cases = [encode(tok, "Story:" + t)[len(encode(tok, "Story:")):] for t in TEXTS]
    for _ in range(150):
        pool = byte_ids if rng.random() < 0.5 else range(vocab + 16)
        cases.append([rng.choice(pool) if rng.random() < 0.6 else rng.randrange(vocab + 16)
                      for _ in range(rng.randint(1, 40))])
    one_call = 0
    for output in cases:
        skip = rng.random() < 0.7
        stopped = rng.random() < 0.3
        params = SamplingParams(max_tokens=None, skip_special_tokens=skip)
        prompt = encode(tok, "Story:")
        windows = IncrementalDetokenizer(tok, prompt, params)
        deferred = IncrementalDetokenizer(tok, prompt, params, deferred=True)
        for i in range(0, len(output), 3):
            last = i + 3 >= len(output)
            windows.update(output[i:i + 3], min(i + 3, len(output)), stopped and last)
            deferred.update(output[i:i + 3], min(i + 3, len(output)), stopped and last)
        text = deferred.get_next_output_text(finished=True, delta=False)
        assert text == windows.get_next_output_text(finished=True, delta=False), (path, output, skip)
        one_call += "\ufffd" not in text
    assert one_call >= len(TEXTS) + 20   # the one-call path, not only the fallback, was checked


def test_deferred_is_off_with_stop_strings():
    """Stop strings are looked for as tokens come, so such a request decodes through the windows."""
    tok = load_tokenizer(DEMO)
    prompt = encode(tok, "Once upon")
    output = encode(tok, "Once upon a time there was a mat")[len(prompt):]
    d = IncrementalDetokenizer(tok, prompt, SamplingParams(stop=["time"], max_tokens=None), deferred=True)
    stop = next(s for i in range(len(output)) if (s := d.update(output[i:i + 1], i + 1)) is not None)
    assert stop == "time" and d.get_next_output_text(finished=True, delta=False) == " a "
