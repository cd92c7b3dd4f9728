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
