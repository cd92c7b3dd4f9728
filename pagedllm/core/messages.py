"""Plain messages between the stages of a step: scheduler -> model runner -> scheduler -> output processor."""
from dataclasses import dataclass, field

from pagedllm.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """A request the runner must (re)build in full: first scheduled, or resumed after preemption."""
    req_id: str
    token_ids: list[int]            # prompt + outputs so far
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int


@dataclass
class CachedRequestData:
    """A request the runner already holds: only what changed."""
    req_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    new_reqs: list[NewRequestData]
    cached_reqs: list[CachedRequestData]
    num_scheduled_tokens: dict[str, int]         # req_id -> tokens run this step
    total_num_scheduled_tokens: int
    finished_req_ids: set[str]                   # ended since the last step: the runner drops their state

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass
class TokenLogprobs:
    """One position: the sampled (or actual prompt) token first, then the top-N; rank of the first."""
    token_ids: list[int]
    logprobs: list[float]
    rank: int


@dataclass
class ModelRunnerOutput:
    sampled_token_ids: dict[str, int] = field(default_factory=dict)   # only requests that reached the end
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)  # sent once, when complete


@dataclass
class EngineCoreOutput:
    """What one step did to one request, for the output processor."""
    req_id: str
    new_token_ids: list[int]
    logprobs: TokenLogprobs | None = None
    prompt_logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None     # "stop", "length", "abort"
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
