"""What users get back (the shapes of vLLM's RequestOutput)."""
from dataclasses import dataclass

from pagedllm.lora.request import LoRARequest


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None             # 1 = most likely
    decoded_token: str | None = None


# One position: token id -> Logprob, holding the sampled (or actual prompt) token and the top-N.
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None    # "stop", "length", "abort"; None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    kv_transfer_params: dict | None = None   # vLLM's: KV moved between engines is not built here, always None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None   # its first sequence's first step (the server's metrics only)
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[PositionLogprobs | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0          # prompt tokens served from the prefix cache
    lora_request: LoRARequest | None = None   # the adapter it ran under (vLLM's); None: the base model
    # vLLM's, for encoder-decoder models and KV transfer, neither built here: always None
    encoder_prompt: str | None = None
    encoder_prompt_token_ids: list[int] | None = None
    kv_transfer_params: dict | None = None
