"""Beam search (vLLM's BeamSearchParams / BeamSearchOutput), with transformers' selection rules.

The engine knows nothing of beams. Each step, every running beam of every prompt becomes a 1-token engine
request asking for its top logprobs, all added together so one engine step serves them all; a beam's
prompt is the prompt plus its tokens so far. Each request is held (hold_kv) and
the next step's beams fork it copy-on-write (kv_parent, core/kv_fork.py: the PagedAttention paper's §4.4):
its full blocks by reference, its last, partial block taken over or copied; each beam then computes only
its new token (the server's beams too, server/beam_search.py). Beams whose fork is not possible (the hold was
dropped for room, a preempted beam) share the full blocks through the block hashes and recompute the partial
one (vLLM v1's design).

Selection follows transformers' `_beam_search` (do_sample=False, early_stopping=False), per prompt:
  candidates = the top (1 + #eos, at least 2) x k of beam score + token logprob over all beams' tokens
  a candidate "hits" when its token is an EOS id (not with ignore_eos) or it reaches max_tokens
  running   = the top k candidates that do not hit
  finished  = the best k of (finished so far, hitting candidates among the top k ranks), by
              cum_logprob / generated_len ** length_penalty (generated_len counts the EOS)
  stop when all k finished slots are filled and the best running beam, normalised at the current length,
  cannot beat the worst finished one (the heuristic is checked after each step and is final), or when
  max_tokens is reached (every top-k candidate then finishes).
"""
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from pagedllm.engine.decode_after import CONTEXT_TOKENS, decode_after
from pagedllm.lora.request import LoRARequest
from pagedllm.outputs import PositionLogprobs
from pagedllm.sampling_params import SamplingParams

@dataclass
class BeamSearchParams:
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0     # vLLM's field; only 0: beams are chosen by the model's logprobs
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    structured_outputs: object = None   # vLLM's field; only None: beams are not constrained by a grammar here

    def __post_init__(self):
        ok_int = lambda v: isinstance(v, int) and not isinstance(v, bool)   # noqa: E731
        if not (ok_int(self.beam_width) and self.beam_width >= 1):
            raise ValueError(f"BeamSearchParams.beam_width must be an integer >= 1, got {self.beam_width!r}")
        if not (ok_int(self.max_tokens) and self.max_tokens >= 1):
            raise ValueError(f"BeamSearchParams.max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.length_penalty, (int, float)) or isinstance(self.length_penalty, bool) \
                or self.length_penalty != self.length_penalty or abs(self.length_penalty) == float("inf"):
            raise ValueError(f"BeamSearchParams.length_penalty must be a finite number, got {self.length_penalty!r}")
        # Beams are chosen by the model's own logprobs (transformers' and vLLM v1's): a temperature would
        # change nothing, so only 0 is accepted rather than silently ignored.
        if self.temperature != 0:
            raise ValueError(f"BeamSearchParams.temperature must be 0 (beams are chosen by the model's "
                             f"logprobs), got {self.temperature!r}")
        if self.structured_outputs is not None:
            raise ValueError("BeamSearchParams.structured_outputs is not built: beam search here follows no grammar "
                             "(generate() with SamplingParams(structured_outputs=...) does)")


def tokens_input(prompt_token_ids: list[int], prompt: str | None = None, cache_salt: str | None = None) -> dict:
    """vLLM's TokensInput (the engine input of a prompt): its ids, and its text and cache salt where it has them."""
    given = {"prompt": prompt, "cache_salt": cache_salt}
    return {"type": "token", "prompt_token_ids": prompt_token_ids, **{k: v for k, v in given.items() if v is not None}}


@dataclass
class BeamSearchSequence:
    """One returned beam, vLLM's fields in vLLM's order (score is this project's): tokens include the prompt, text
    is set on the returned beams."""
    orig_prompt: dict                         # vLLM's TokensInput: type, prompt_token_ids[, prompt, cache_salt]
    tokens: list[int]
    logprobs: list[PositionLogprobs]          # per generated token: its top logprobs, the chosen one first
    lora_request: LoRARequest | None = None   # the adapter its prompt ran under (vLLM's); None: the base model
    cum_logprob: float = 0.0                  # sum of the generated tokens' logprobs
    text: str | None = None
    finish_reason: str | None = None          # "stop" (an EOS id) or "length"
    stop_reason: int | None = None            # the EOS id that ended it
    score: float = 0.0                        # cum_logprob / generated_len ** length_penalty (transformers')

    def get_prompt(self) -> dict:
        """vLLM's: the beam as an engine input (its prompt's text and cache salt, all its tokens)."""
        return tokens_input(self.tokens, self.orig_prompt.get("prompt"), self.orig_prompt.get("cache_salt"))


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]       # best first


@dataclass
class _Beam:
    tokens: list[int]                         # generated only
    cum_logprob: float
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    kv_parent: str | None = None              # the engine request that expanded the beam it extends
    req_id: str | None = None                 # the engine request that expands it


@dataclass
class _Candidate:
    score: float
    beam: _Beam
    token: int
    position: PositionLogprobs


class BeamSearchInstance:
    """One prompt's search; `step` takes each running beam's top logprobs (token id -> logprob)."""

    def __init__(self, prompt_token_ids: list[int], params: BeamSearchParams, eos_token_ids: set[int],
                 orig_prompt: dict | None = None):
        """orig_prompt: the prompt as the returned beams show it (tokens_input); None: its token ids alone."""
        self.prompt_token_ids = list(prompt_token_ids)
        self.orig_prompt = orig_prompt or tokens_input(self.prompt_token_ids)
        self.params = params
        self.eos_token_ids = set() if params.ignore_eos else set(eos_token_ids)
        self.num_candidates = candidates_per_step(params, len(eos_token_ids))
        self.running = [_Beam([], 0.0)]
        self.finished: list[tuple[float, _Beam]] = []   # (score, beam), best first, at most beam_width
        self.improvable = True        # transformers' is_early_stop_heuristic_unsatisfied
        self.num_generated = 0
        self.done = False

    def beam_prompts(self) -> list[list[int]]:
        """The token ids to expand this step, one per running beam."""
        return [self.prompt_token_ids + b.tokens for b in self.running]

    def beam_parents(self) -> list[str | None]:
        """Per running beam, the held engine request whose KV its request can fork (None on the first step)."""
        return [b.kv_parent for b in self.running]

    def step(self, top_logprobs: list[PositionLogprobs], req_ids: list[str] | None = None):
        """req_ids: the engine requests that expanded the running beams (their children's kv_parent)."""
        for b, rid in zip(self.running, req_ids or ()):
            b.req_id = rid
        k, lp = self.params.beam_width, self.params.length_penalty
        self.num_generated += 1
        t = self.num_generated
        candidates = [_Candidate(b.cum_logprob + p.logprob, b, tok, pos)
                      for b, pos in zip(self.running, top_logprobs) for tok, p in pos.items()]
        candidates.sort(key=lambda c: -c.score)    # stable: ties keep beam order, then logprob order
        candidates = candidates[:self.num_candidates]
        hits = [c.token in self.eos_token_ids or t >= self.params.max_tokens for c in candidates]
        self.running = [_extend(c) for c in [c for c, hit in zip(candidates, hits) if not hit][:k]]
        if self.improvable:
            new = [(c.score / t ** lp, _extend(c)) for c, hit in zip(candidates[:k], hits[:k]) if hit]
            self.finished = sorted(self.finished + new, key=lambda f: -f[0])[:k]
        if len(self.finished) == k and self.running:
            self.improvable &= self.running[0].cum_logprob / t ** lp > self.finished[-1][0]
        self.done = not self.improvable or not self.running or t >= self.params.max_tokens

    def results(self) -> list[BeamSearchSequence]:
        """The best beam_width finished beams; running ones fill the rest (only when fewer finished)."""
        k, lp = self.params.beam_width, self.params.length_penalty
        best = list(self.finished)
        if len(best) < k:
            best += [(b.cum_logprob / max(len(b.tokens), 1) ** lp, b) for b in self.running[:k - len(best)]]
        return [self._sequence(score, beam) for score, beam in best]

    def _sequence(self, score: float, beam: _Beam) -> BeamSearchSequence:
        eos = bool(beam.tokens) and beam.tokens[-1] in self.eos_token_ids
        return BeamSearchSequence(self.orig_prompt, self.prompt_token_ids + beam.tokens, beam.logprobs,
                                  cum_logprob=beam.cum_logprob, score=score, finish_reason="stop" if eos else "length",
                                  stop_reason=beam.tokens[-1] if eos else None)


def _extend(c: _Candidate) -> _Beam:
    return _Beam(c.beam.tokens + [c.token], c.score, c.beam.logprobs + [_chosen_first(c.position, c.token)],
                 kv_parent=c.beam.req_id)


def _chosen_first(position: PositionLogprobs, token: int) -> PositionLogprobs:
    return {token: position[token], **{t: p for t, p in position.items() if t != token}}


MIN_CANDIDATES_PER_BEAM = 2   # a step ranks at least this many tokens a beam (the most a position's logprobs show)


def candidates_per_step(params: BeamSearchParams, num_eos: int) -> int:
    """transformers' beams_to_keep: enough that k beams keep running even when every beam's EOS ids rank high."""
    return max(MIN_CANDIDATES_PER_BEAM, 1 + (0 if params.ignore_eos else num_eos)) * params.beam_width


def step_sampling_params(params: BeamSearchParams, num_eos: int, max_logprobs: int) -> SamplingParams:
    """The 1-token request of one beam for one step; max_logprobs: the engine's (InputProcessor's) bound."""
    num = candidates_per_step(params, num_eos)
    if num > max_logprobs:
        raise ValueError(f"BeamSearchParams.beam_width must be at most {max_logprobs // (num // params.beam_width)} "
                         f"(each step asks each beam for {num} top logprobs, {num // params.beam_width} x "
                         f"beam_width: 1 + the EOS ids, at least 2; at most max_logprobs ({max_logprobs}): "
                         f"raise --max-logprobs for more), got {params.beam_width}")
    # detokenized: its logprobs' token texts are the beams' (detokenize=False leaves them None, as vLLM's)
    return SamplingParams(max_tokens=1, logprobs=num, temperature=0.0, ignore_eos=True)


def check_length(prompt_len: int, params: BeamSearchParams, max_model_len: int, max_kv_tokens: int | None = None):
    """Before the first step: a beam of prompt + max_tokens tokens fits the context and the KV cache (a step
    request past either was refused mid-search, naming its own lengths)."""
    limits = [(max_model_len, f"max_model_len ({max_model_len})")]
    if max_kv_tokens is not None:
        limits.append((max_kv_tokens, f"what the KV cache holds ({max_kv_tokens} tokens)"))
    for most, what in limits:
        if prompt_len + params.max_tokens > most:   # named as the caller set it: BeamSearchParams'
            raise ValueError(f"BeamSearchParams.max_tokens must be at most {what} - prompt length ({prompt_len}), "
                             f"got {params.max_tokens}")


def finish_text(seq: BeamSearchSequence, prompt_len: int, params: BeamSearchParams, decode: Callable,
                with_prompt: bool, special_ids=()) -> str:
    """vLLM's: offline the text of all tokens; the server's only the generated ones. The ending EOS is left out
    unless include_stop_str_in_output; on the server a special one (special_ids) is left out even then, as the
    text of a sampled answer skips special tokens (vLLM's beams never show it there)."""
    tokens = seq.tokens if with_prompt else seq.tokens[prompt_len:]
    if seq.finish_reason == "stop" and (not params.include_stop_str_in_output
                                        or (not with_prompt and tokens[-1] in special_ids)):
        tokens = tokens[:-1]
    if with_prompt:
        return decode(tokens)
    # after the prompt's last tokens, as sampling's text reads (its first token's leading space kept)
    return decode_after(decode, seq.tokens[max(0, prompt_len - CONTEXT_TOKENS):prompt_len], tokens)


def run_beam_search(instances: list[BeamSearchInstance], expand: Callable):
    """Drives every instance to its end; `expand(prompts, parents, owners)` runs one engine step's worth of beam
    prompts (all of them in one batch; parents: each one's kv_parent or None; owners: the index in `instances` of
    each one's instance) and returns each one's top logprobs and the ids of the engine requests that ran them."""
    while True:
        live = [(i, inst) for i, inst in enumerate(instances) if not inst.done]
        if not live:
            return
        prompts = [inst.beam_prompts() for _, inst in live]
        parents = list(itertools.chain.from_iterable(inst.beam_parents() for _, inst in live))
        owners = [i for (i, _), beams in zip(live, prompts) for _ in beams]
        positions, req_ids = expand(list(itertools.chain.from_iterable(prompts)), parents, owners)
        positions, req_ids = iter(positions), iter(req_ids)
        for (_, inst), beams in zip(live, prompts):
            inst.step([next(positions) for _ in beams], [next(req_ids) for _ in beams])


def unshared_blocks(instances: list[BeamSearchInstance], block_size: int) -> int:
    """Blocks this step's beam requests would hold with no sharing: each beam its own ceil(len / block_size)."""
    return sum(-(-len(p) // block_size) for inst in instances if not inst.done for p in inst.beam_prompts())


def beam_cache_salt(search_id: str, enable_prefix_caching: bool) -> str | None:
    """Beams share blocks through their hashes: with prefix caching on, as every request does (None); off,
    through a salt of their own search, which no other request shares."""
    return None if enable_prefix_caching else f"beam-{search_id}"
