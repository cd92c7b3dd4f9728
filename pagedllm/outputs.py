"""What users get back (the shapes of vLLM's RequestOutput)."""
from collections.abc import MutableSequence
from dataclasses import dataclass, field

from pagedllm.lora.request import LoRARequest


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None             # 1 = most likely
    decoded_token: str | None = None


# One position: token id -> Logprob, holding the sampled (or actual prompt) token and the top-N.
PositionLogprobs = dict[int, Logprob]



@dataclass
class FlatLogprobs(MutableSequence):
    """vLLM's: the positions' logprobs in a few flat lists (SamplingParams.flat_logprobs), read as a list of
    positions: [i] is position i's {token id: Logprob} ({} where a list holds None, the prompt's first), a slice
    another FlatLogprobs. Read-only but for append and extend."""
    start_indices: list[int] = field(default_factory=list)   # position i is entries start_indices[i]:end_indices[i]
    end_indices: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    ranks: list[int | None] = field(default_factory=list)
    decoded_tokens: list[str | None] = field(default_factory=list)

    @classmethod
    def from_positions(cls, positions) -> "FlatLogprobs":
        flat = cls()
        flat.extend(positions)
        return flat

    def append(self, position: PositionLogprobs | None) -> None:
        self.start_indices.append(len(self.logprobs))
        for token_id, lp in (position or {}).items():
            self.token_ids.append(token_id)
            self.logprobs.append(lp.logprob)
            self.ranks.append(lp.rank)
            self.decoded_tokens.append(lp.decoded_token)
        self.end_indices.append(len(self.logprobs))

    def extend(self, positions) -> None:
        for position in positions:
            self.append(position)

    def __len__(self) -> int:
        return len(self.start_indices)

    def __getitem__(self, index):
        if isinstance(index, slice):
            starts, ends = self.start_indices[index], self.end_indices[index]
            lo = starts[0] if starts else 0
            entries = slice(lo, ends[-1] if ends else 0)
            if lo:   # rebased to the slice's entries; from 0 (a cumulative output's copy) they stand as they are
                starts, ends = [i - lo for i in starts], [i - lo for i in ends]
            return FlatLogprobs(starts, ends, self.token_ids[entries],
                                self.logprobs[entries], self.ranks[entries], self.decoded_tokens[entries])
        if not isinstance(index, int):
            raise TypeError(f"FlatLogprobs indices must be integers or slices, not {type(index).__name__}")
        return {self.token_ids[i]: Logprob(self.logprobs[i], self.ranks[i], self.decoded_tokens[i])
                for i in range(self.start_indices[index], self.end_indices[index])}

    def __setitem__(self, index, value):
        raise TypeError("FlatLogprobs cannot be changed, only appended to")

    def __delitem__(self, index):
        raise TypeError("FlatLogprobs cannot be changed, only appended to")

    def insert(self, index, value):
        raise TypeError("FlatLogprobs cannot be changed, only appended to")


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
    lora_request: LoRARequest | None = None   # the adapter it ran under (vLLM's); None: the base model
    routed_experts: None = None              # vLLM's, for mixture-of-experts models (none built here): always None

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
    metrics: RequestMetrics | None = None   # every engine output has them; None only where a caller builds one
    num_cached_tokens: int = 0          # prompt tokens served from the prefix cache
    lora_request: LoRARequest | None = None   # the adapter it ran under (vLLM's); None: the base model
    # vLLM's, for encoder-decoder models and KV transfer, neither built here: always None
    encoder_prompt: str | None = None
    encoder_prompt_token_ids: list[int] | None = None
    kv_transfer_params: dict | None = None
