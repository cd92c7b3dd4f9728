"""The text of a returned beam (beam_search.finish_text): the server's holds the generated tokens alone, as they
read after the prompt; a SentencePiece first token keeps its leading space (decoded alone it lost it: " loved"
read "loved", where sampling's text has the space)."""
from transformers import AutoTokenizer

from pagedllm.beam_search import BeamSearchParams, BeamSearchSequence, finish_text
from pagedllm.config import DEMO_MODEL


def test_generated_text_keeps_its_leading_space():
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    prompt = tok.encode("Once upon a time, Lily")
    out = tok.encode(" loved to play", add_special_tokens=False)
    assert tok.decode(out).startswith("loved")   # what decoding the tokens alone gives
    seq = BeamSearchSequence({"type": "token", "prompt_token_ids": prompt}, prompt + out + [tok.eos_token_id], [],
                             finish_reason="stop")
    params = BeamSearchParams(beam_width=2, max_tokens=8)
    assert finish_text(seq, len(prompt), params, tok.decode, with_prompt=False) == " loved to play"
    assert finish_text(seq, len(prompt), params, tok.decode, with_prompt=True) == tok.decode(prompt + out)


def test_server_text_shows_no_special_eos_even_with_include_stop_str():
    """The server's beam text with include_stop_str_in_output: an ending special EOS shows no text ("</s>" was
    there), as a sampled answer's text skips special tokens and vLLM's beams leave it out; a plain-token EOS id
    (a generation config's) shows, as sampling's stop token would. Offline keeps vLLM's raw text of all tokens."""
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    prompt = tok.encode("Once upon a time, Lily")
    out = tok.encode(" loved to play", add_special_tokens=False)
    params = BeamSearchParams(beam_width=2, max_tokens=8, include_stop_str_in_output=True)
    orig = {"type": "token", "prompt_token_ids": prompt}
    special = frozenset(tok.all_special_ids)
    ended_by_eos = BeamSearchSequence(orig, prompt + out + [tok.eos_token_id], [], finish_reason="stop")
    assert tok.eos_token_id in special
    assert finish_text(ended_by_eos, len(prompt), params, tok.decode, with_prompt=False,
                       special_ids=special) == " loved to play"
    assert finish_text(ended_by_eos, len(prompt), params, tok.decode,
                       with_prompt=True).endswith(tok.decode([tok.eos_token_id]))
    plain_eos = tok.encode(" ball", add_special_tokens=False)[-1:]
    ended_by_plain = BeamSearchSequence(orig, prompt + out + plain_eos, [], finish_reason="stop")
    assert finish_text(ended_by_plain, len(prompt), params, tok.decode, with_prompt=False,
                       special_ids=special) == tok.decode(prompt + out + plain_eos)[len(tok.decode(prompt)):]
