"""Blocks beam search holds, against no sharing (the PagedAttention paper's §4.4 figure).

peak: the most KV blocks in use at the end of any step's scheduling during one beam search; unshared: the
most blocks the same steps' beams would hold if each kept its own copy of its prefix (sum over beams of
ceil(tokens / block_size)). Run on random prompt tokens with ignore_eos, so every beam runs max_tokens steps.
"""
import random

from pagedllm.beam_search import BeamSearchParams


def beam_block_sharing(llm, beam_width: int = 4, prompt_len: int = 100, max_tokens: int = 16,
                       seed: int = 0) -> tuple[int, int]:
    rng = random.Random(seed)
    prompt = [rng.randrange(3, llm.engine.vocab_size) for _ in range(prompt_len)]
    llm.beam_search([prompt], BeamSearchParams(beam_width=beam_width, max_tokens=max_tokens, ignore_eos=True))
    return llm.last_beam_search_blocks
