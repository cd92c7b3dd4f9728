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
class DiskOp:
    """Write a block to the disk tier as `block_hash`, from a CPU slot or a GPU block; with neither, delete
    that file. Applied in list order: a delete that makes room comes before the write it makes room for."""
    block_hash: bytes
    cpu_slot: int | None = None
    gpu_block: int | None = None


@dataclass
class KVTransfers:
    """Block copies between the KV tiers, decided by core/offload.py and done by the runner before the forward
    (runner/kv_offload.py, which also states their order). GPU blocks and CPU slots are ids; swap and tier
    slots are ranges of one CPU pool."""
    swap_out: list[tuple[int, int]] = field(default_factory=list)    # (gpu block, cpu slot)
    swap_in: list[tuple[int, int]] = field(default_factory=list)     # (cpu slot, gpu block)
    cpu_store: list[tuple[int, int]] = field(default_factory=list)   # (gpu block, cpu slot)
    cpu_load: list[tuple[int, int]] = field(default_factory=list)    # (cpu slot, gpu block)
    disk_ops: list[DiskOp] = field(default_factory=list)
    disk_reads: list[tuple[bytes, int]] = field(default_factory=list)  # (block hash, cpu slot): read, verify
    # (src, dst) GPU blocks: a forked request's copy of its parent's partial block (core/kv_fork.py), done
    # after the tier copies read their blocks and before they write any (runner/kv_offload.py)
    block_copies: list[tuple[int, int]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.swap_out or self.swap_in or self.cpu_store or self.cpu_load or self.disk_ops
                    or self.disk_reads or self.block_copies)


@dataclass
class KVTransferResult:
    """What the runner reports back: disk reads that failed (missing, truncated, corrupt or foreign file:
    the slot holds nothing), and transfer times per tier finished since the last report."""
    failed_reads: dict[bytes, str] = field(default_factory=dict)     # block hash -> reason
    store_seconds: dict[str, float] = field(default_factory=dict)    # tier -> seconds
    load_seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class SchedulerOutput:
    new_reqs: list[NewRequestData]
    cached_reqs: list[CachedRequestData]
    num_scheduled_tokens: dict[str, int]         # req_id -> tokens run this step
    total_num_scheduled_tokens: int
    finished_req_ids: set[str]                   # ended since the last step: the runner drops their state
    kv_transfers: KVTransfers = field(default_factory=KVTransfers)
    # req_id -> proposed tokens, verified this step after the request's last token (speculative decoding; a
    # draft model's are placeholders here, proposed on the device by the runner)
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)

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
    # only requests that reached the end: the token sampled, or a verified row's accepted proposals and one more
    sampled_token_ids: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)   # one per token sampled
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)  # sent once, when complete
    kv_transfer: KVTransferResult | None = None


@dataclass
class EngineCoreOutput:
    """What one step did to one request, for the output processor."""
    req_id: str
    new_token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None   # one per new token
    prompt_logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None     # "stop", "length", "abort", "error"
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    error: str | None = None             # finish_reason "error": what raised (type: message)
    bad_request: bool = False            # the error is the request's own (a constraint that cannot compile)
