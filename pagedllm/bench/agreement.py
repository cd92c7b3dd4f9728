"""How closely a reduced-precision engine keeps float32's greedy tokens: two measures of the same outputs.

free-running: tokens before the first divergence, summed over prompts, over all tokens. After one flipped
    near-tie the two engines continue different texts, so one flip at position 11 of 32 costs 21 tokens.
teacher-forced: each of the n positions predicted from float32's own prefix (prompt logprobs of the prompt
    followed by float32's tokens); the share of positions whose top token is float32's. It counts each flip
    once, and gives float32's logprob gap at each flip: a small gap is a near-tie, a large one a real error.
"""
import math
from dataclasses import dataclass

import torch

from pagedllm.outputs import Logprob, PositionLogprobs, RequestOutput
from pagedllm.sampling_params import SamplingParams

TOP = 5   # logprobs kept per position: the other engine's choice is nearly always among float32's top 5
# A flip whose float32 gap is below this is one rounding can cause: bf16's logprob of a token is off by up to
# 0.20 nats on the demo model (512 broad prompts, CPU), and the flips seen there had gaps up to 0.14.
NEAR_TIE = 0.3

# The test prompts of the demo model (tests and benchmarks/bf16_agreement.py) and 512 broader ones.
PROMPTS = ["Once upon a time", "The little dog", "Lily wanted to", "One day, a big", "Tom and Sam went to the",
           "She looked at the sky and", "The cat sat", "There was a"]
_SUBJECTS = ["Once", "The", "Lily", "Tom", "She", "A", "One day", "There", "Mom", "The big", "He", "Sue and Ben", "Tim",
             "The sun", "It was", "Max", "The bird", "Anna", "The little girl", "Ben", "The dog", "A boy", "Sara",
             "The tree", "Dad", "Jack", "The king", "Amy", "The fish", "Sam", "Kitty", "The car"]
_VERBS = ["was", "saw a", "liked to", "went", "had a", "found", "wanted", "said", "looked at", "played with",
          "ran to", "was very", "made a", "did not", "loved", "could"]
BROAD_PROMPTS = [f"{s} {v}" for s in _SUBJECTS for v in _VERBS]


@dataclass
class ForcedAgreement:
    share: float            # positions whose top token is float32's
    gaps: list[float]       # float32 logprob(own token) - logprob(other's), per flip
    logprob_error: float    # mean |other's - float32's logprob| of float32's token


def greedy(llm, prompts, n: int) -> list[RequestOutput]:
    return llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)


def token_ids(outputs: list[RequestOutput]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def free_running(ref: list[list[int]], got: list[list[int]]) -> float:
    """Token ids per prompt: float32's, the other engine's."""
    same = sum(next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
               for x, y in zip(ref, got, strict=True))
    return same / sum(len(x) for x in ref)


def forced_positions(llm, ref: list[RequestOutput]) -> list[list[PositionLogprobs]]:
    """Per reference output, the logprobs `llm` gives each of its n positions after the same prefix."""
    prompts = [{"prompt_token_ids": r.prompt_token_ids + r.outputs[0].token_ids[:-1]} for r in ref]
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=TOP, logprobs=TOP)
    outs = llm.generate(prompts, params, use_tqdm=False)
    # prompt position k + j holds the logprobs of token j of the continuation; the last one is generated
    return [o.prompt_logprobs[len(r.prompt_token_ids):] + [o.outputs[0].logprobs[0]] for o, r in zip(outs, ref)]


def hf_forced_positions(model_dir: str, dtype: torch.dtype, device: str,
                        ref: list[RequestOutput]) -> list[list[PositionLogprobs]]:
    """forced_positions of transformers itself (the yardstick), one prompt at a time, no padding."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    result = []
    for r in ref:
        cont, k = r.outputs[0].token_ids, len(r.prompt_token_ids)
        ids = torch.tensor([r.prompt_token_ids + cont[:-1]], device=device)
        with torch.no_grad():
            logprobs = model(ids).logits[0, k - 1:].float().log_softmax(-1).cpu()
        positions = []
        for token, lp in zip(cont, logprobs, strict=True):
            values, top = lp.topk(TOP)
            entry = {int(t): Logprob(float(v), rank + 1) for rank, (t, v) in enumerate(zip(top, values))}
            entry.setdefault(token, Logprob(float(lp[token]), int((lp > lp[token]).sum()) + 1))
            positions.append(entry)
        result.append(positions)
    return result


def top_token(position: PositionLogprobs) -> int:
    return next(t for t, lp in position.items() if lp.rank == 1)


def teacher_forced(ref: list[RequestOutput], ref_positions: list[list[PositionLogprobs]],
                   got_positions: list[list[PositionLogprobs]]) -> ForcedAgreement:
    """ref_positions: forced_positions of the float32 engine itself (its top tokens are ref's tokens)."""
    same = total = 0
    gaps, error = [], 0.0
    for r, own, other in zip(ref, ref_positions, got_positions, strict=True):
        for token, p32, p in zip(r.outputs[0].token_ids, own, other, strict=True):
            total += 1
            error += abs(p[token].logprob - p32[token].logprob)   # a prompt position always holds its token
            chosen = top_token(p)
            if chosen == token:
                same += 1
            else:
                gaps.append(p32[token].logprob - p32[chosen].logprob if chosen in p32 else math.inf)
    return ForcedAgreement(same / total, gaps, error / total)
