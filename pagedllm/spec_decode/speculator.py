"""Which rows of a step speculate, and how far: the policy that keeps speculation from costing throughput.

Speculation makes a step synchronous (its proposals need the tokens of the step before) and gives each row
k + 1 tokens to verify. That is nearly free while a step is bound by reading the weights (small batches) and
costs throughput once it is bound by compute. So a step speculates only while at most `disable_by_batch_size`
requests run or wait, and its rows x (k + 1) stay within `max_step_tokens` (fewer proposals per row beyond);
otherwise it runs as without speculation (async scheduling, nothing else changes).

A row speculates only where its tokens alone decide its distribution: no structured output, logits processors
(penalties, logit bias, bad words, allowed ids) or min_tokens bans still ahead. The others run in the same
steps without proposals, so every request gets exactly what it asked for.
"""
from pagedllm.request import Request, RequestStatus
from pagedllm.sample.logits_processors import uses_processors
from pagedllm.spec_decode.config import SpeculativeConfig
from pagedllm.spec_decode.ngram import NgramProposer


class Speculator:
    def __init__(self, config: SpeculativeConfig, max_model_len: int):
        self.config = config
        self.max_model_len = max_model_len
        self.ngram = None
        if config.method == "ngram":
            self.ngram = NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max,
                                       config.num_speculative_tokens)

    def wants_step(self, running: list[Request], num_waiting: int) -> bool:
        """Whether this step may speculate (the caller then finishes the step in flight first)."""
        return bool(running) and len(running) + num_waiting <= self.config.disable_by_batch_size

    def propose(self, running: list[Request]) -> dict[str, list[int]]:
        """req_id -> proposed tokens of this step (a draft model's: placeholders of the right length)."""
        k = min(self.config.num_speculative_tokens, self.config.max_step_tokens // len(running) - 1)
        spec = {}
        if k <= 0:
            return spec
        for req in running:
            room = min(k, req.max_tokens - req.num_output_tokens - 1, self.max_model_len - req.num_tokens - 1)
            if room <= 0 or not _eligible(req):
                continue
            ids = [0] * room if self.ngram is None else self.ngram.propose(req.all_token_ids, room)
            if ids:
                spec[req.request_id] = ids
        return spec


def _eligible(req: Request) -> bool:
    p = req.sampling_params
    return (req.status == RequestStatus.RUNNING and req.num_output_placeholders == 0
            and req.num_computed_tokens == req.num_tokens - 1 and req.grammar is None
            and req.num_output_tokens >= p.min_tokens and not uses_processors(p))
