"""Which rows of a step speculate, and how far: the policy that keeps speculation from costing throughput.

Speculation makes a step synchronous (its proposals need the tokens of the step before) and gives each row
k + 1 tokens to verify. That is nearly free while a step is bound by reading the weights (small batches) and
costs throughput once it is bound by compute. So a step speculates only while at most `disable_by_batch_size`
requests run or wait, and its rows x (k + 1) stay within `max_step_tokens` (fewer proposals per row beyond);
otherwise it runs as without speculation (async scheduling, nothing else changes).

Proposals that are rejected cost a draft's passes and a synchronous step for nothing, and so does an n-gram
lookup that finds nothing. So each request keeps a moving average of the proposals it gets accepted (a lookup
that finds nothing counts as none); below MIN_ACCEPTED a draft, it stops proposing for 2, 4, 8, ... steps (at
most MAX_BACKOFF), then tries again. A step where no request is due runs without speculation (asynchronously).
H200, W1 (Qwen3-0.6B shape, random prompts: lookups rarely match) with n-gram configured: 0.93x of off before
lookups that found nothing counted.

A row speculates only where its tokens alone decide its distribution: no structured output, logits processors
(penalties, logit bias, bad words, allowed ids) or min_tokens bans still ahead. The others run in the same steps
without proposals, so every request gets exactly what it asked for. Seeded sampled rows speculate too: the
rejection sampler draws each of their positions as plain sampling would (from the seed and the token's index),
so whether a step speculates, which depends on the batch, does not change their tokens.
"""
from dataclasses import dataclass

from pagedllm.metrics import SpecDecodeStats
from pagedllm.request import Request, RequestStatus
from pagedllm.sample.logits_processors import uses_processors
from pagedllm.spec_decode.config import SpeculativeConfig
from pagedllm.spec_decode.ngram import NgramProposer, TokenArrays


MIN_ACCEPTED = 0.5    # accepted proposals a draft, on average, below which a request backs off
MAX_BACKOFF = 256     # steps
_EMA = 0.3            # weight of the newest draft in the average


@dataclass
class _Track:
    """A request's recent acceptance, and when it may propose again."""
    accepted: float
    failures: int = 0
    resume_at: int = 0


class Speculator:
    def __init__(self, config: SpeculativeConfig, max_model_len: int):
        self.config = config
        self.max_model_len = max_model_len
        self.stats = SpecDecodeStats()
        self.num_steps = 0
        self.tracks: dict[str, _Track] = {}
        self.ngram = self.tokens = None
        if config.method == "ngram":
            self.ngram = NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max,
                                       config.num_speculative_tokens)
            self.tokens = TokenArrays()

    def wants_step(self, running: list[Request], num_waiting: int) -> bool:
        """Whether this step may speculate (the caller then finishes the step in flight first)."""
        self.num_steps += 1
        if not running or len(running) + num_waiting > self.config.disable_by_batch_size:
            return False
        return any(self._due(r) and _may_speculate(r) for r in running)

    def propose(self, running: list[Request]) -> dict[str, list[int]]:
        """req_id -> proposed tokens of this step (a draft model's: placeholders of the right length)."""
        spec = {}
        k = min(self.config.num_speculative_tokens, self.config.max_step_tokens // max(len(running), 1) - 1)
        if k <= 0:
            return spec
        for req in running:
            room = min(k, req.max_tokens - req.num_output_tokens - 1, self.max_model_len - req.num_tokens - 1)
            if room <= 0 or not self._due(req) or not _eligible(req):
                continue
            if self.ngram is None:
                spec[req.request_id] = [0] * room
            elif ids := self.ngram.propose(self.tokens.get(req.request_id, req.all_token_ids), room):
                spec[req.request_id] = ids
            else:   # nothing to propose costs like a rejected draft: the step was made synchronous for it
                self._back_off(req.request_id, 0)
        return spec

    def observe(self, req_id: str, num_proposed: int, num_accepted: int):
        """A verified draft's outcome: the counters, the request's average and its back-off."""
        self.stats.record(num_proposed, num_accepted)
        self._back_off(req_id, num_accepted)

    def forget(self, req_ids):
        """Requests that ended (a step's finished ids): their averages and token arrays go."""
        for req_id in req_ids:
            self.tracks.pop(req_id, None)
        if self.tokens is not None:
            self.tokens.forget(req_ids)

    def _back_off(self, req_id: str, num_accepted: int):
        t = self.tracks.get(req_id)
        if t is None:
            t = self.tracks[req_id] = _Track(float(num_accepted))
        t.accepted = (1 - _EMA) * t.accepted + _EMA * num_accepted
        if t.accepted >= MIN_ACCEPTED:
            t.failures = 0
            return
        t.failures += 1
        t.resume_at = self.num_steps + min(2 ** t.failures, MAX_BACKOFF)
        t.accepted = MIN_ACCEPTED   # the retry starts from the threshold, so one good draft resumes it

    def _due(self, req: Request) -> bool:
        t = self.tracks.get(req.request_id)
        return t is None or self.num_steps >= t.resume_at


def _may_speculate(req: Request) -> bool:
    """Its prompt is computed (chunks of a long prompt stay asynchronous) and its parameters allow it (its step
    in flight aside)."""
    p = req.sampling_params
    return (req.num_computed_tokens >= req.num_prompt_tokens and req.grammar is None and not uses_processors(p)
            and req.num_output_tokens + 1 >= p.min_tokens)


def _eligible(req: Request) -> bool:
    """A decode row with nothing in flight, whose distribution its tokens alone decide."""
    return (req.status == RequestStatus.RUNNING and req.num_output_placeholders == 0
            and req.num_computed_tokens == req.num_tokens - 1 and _may_speculate(req)
            and req.num_output_tokens >= req.sampling_params.min_tokens)
