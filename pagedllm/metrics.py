"""Engine statistics: counts the scheduler keeps, and the periodic log line."""
import bisect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

logger = logging.getLogger("pagedllm")


@dataclass
class KVTierStats:
    """One tier of the KV hierarchy below the GPU ("swap", "cpu", "disk"); cumulative, counted in blocks."""
    hits: int = 0            # blocks loaded from this tier instead of being recomputed
    misses: int = 0          # lookups that went on past this tier (or swap-outs that found the pool full)
    invalid: int = 0         # blocks found truncated, corrupt or foreign, removed (disk)
    bytes_stored: int = 0
    bytes_loaded: int = 0
    store_seconds: float = 0.0   # transfer time into the tier (on CUDA: measured on the copy stream)
    load_seconds: float = 0.0    # transfer time out of it into GPU blocks (disk: file reads)

    @property
    def load_gb_per_s(self) -> float:
        return self.bytes_loaded / self.load_seconds / 1e9 if self.load_seconds else 0.0


@dataclass
class SpecDecodeStats:
    """Speculative decoding, cumulative (vLLM's counters): a draft is one row's proposals in one step."""
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)   # drafts whose position i was accepted

    def record(self, num_draft: int, num_accepted: int):
        self.num_drafts += 1
        self.num_draft_tokens += num_draft
        self.num_accepted_tokens += num_accepted
        if len(self.accepted_per_pos) < num_draft:
            self.accepted_per_pos += [0] * (num_draft - len(self.accepted_per_pos))
        for i in range(num_accepted):
            self.accepted_per_pos[i] += 1

    def snapshot(self) -> "SpecDecodeStats":
        return SpecDecodeStats(self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens,
                               list(self.accepted_per_pos))

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens a verify step emits per row: the accepted proposals and the target's own token."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


# vLLM's iteration_tokens_total bounds
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


@dataclass
class TokenHistogram:
    """Tokens per engine step (vLLM's iteration_tokens_total), cumulative. Kept in the core, so there is one
    histogram however many API processes serve its outputs."""
    bounds: tuple[int, ...] = ITERATION_TOKEN_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(ITERATION_TOKEN_BUCKETS) + 1))   # last: +Inf
    total: int = 0

    def observe(self, value: int):
        self.counts[bisect.bisect_left(self.bounds, value)] += 1   # the first bound >= value (le)
        self.total += value

    def snapshot(self) -> "TokenHistogram":
        return TokenHistogram(self.bounds, list(self.counts), self.total)


@dataclass
class PromptTokenSources:
    """vLLM's prompt_tokens_by_source: each request's whole prompt, counted at its first token (a recompute after
    preemption is not), by where its KV came from. vLLM's KV offloading is a KV connector: a tier below the GPU
    here is its external_kv_transfer."""
    local_compute: int = 0
    local_cache_hit: int = 0          # the GPU prefix cache
    external_kv_transfer: int = 0     # loaded from the CPU or disk tier

    def record(self, num_prompt_tokens: int, num_cached_tokens: int, num_loaded_tokens: int) -> int:
        """Returns the tokens computed."""
        num_cached = min(max(num_cached_tokens, 0), num_prompt_tokens)
        num_loaded = min(num_loaded_tokens, num_cached)
        self.local_compute += num_prompt_tokens - num_cached
        self.local_cache_hit += num_cached - num_loaded
        self.external_kv_transfer += num_loaded
        return num_prompt_tokens - num_cached

    @property
    def total(self) -> int:
        return self.local_compute + self.local_cache_hit + self.external_kv_transfer


@dataclass
class SchedulerStats:
    num_running: int
    num_waiting: int
    num_blocks_total: int
    num_blocks_free: int
    kv_cache_usage: float          # share of blocks in use
    prefix_cache_queries: int      # tokens looked up in the prefix cache (cumulative)
    prefix_cache_hits: int         # tokens found (cumulative)
    num_preemptions: int           # cumulative
    num_prompt_tokens: int         # prompt tokens computed (cumulative; prefix hits excluded)
    num_generation_tokens: int     # cumulative
    # KV accounting since start or Engine.reset_peak_stats() (definitions in core/kv_usage.py)
    peak_blocks: int               # most KV blocks in use at the end of a step's scheduling
    peak_running: int              # most requests running in one step
    kv_waste_at_peak: float        # share of allocated KV slots holding no token, at peak_blocks
    kv_tiers: dict[str, KVTierStats] = field(default_factory=dict)   # tier name -> its stats (enabled tiers)
    spec_decode: SpecDecodeStats | None = None   # None: speculative decoding is off
    # LoRA on: adapter name -> its requests running / waiting (vLLM's lora_requests_info); None: LoRA is off
    running_lora_adapters: dict[str, int] | None = None
    waiting_lora_adapters: dict[str, int] | None = None
    prompt_token_sources: PromptTokenSources = field(default_factory=PromptTokenSources)
    num_waiting_deferred: int = 0  # of num_waiting, those on an adapter's load or a grammar's compile, not on room
    # vLLM's: per step, the computed prompt tokens of requests whose first token came in it, and the tokens sampled
    iteration_tokens: TokenHistogram = field(default_factory=TokenHistogram)
    sleep_level: int | None = None  # the engine sleeps at this level (sleep(0) until resumed); None: awake

    @property
    def num_prompt_tokens_total(self) -> int:
        """vLLM's prompt_tokens: the whole prompt of each request (cached tokens too), once, at its first token."""
        return self.prompt_token_sources.total

    @property
    def num_blocks_used(self) -> int:
        return self.num_blocks_total - self.num_blocks_free

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


@dataclass
class FinishedRequestStats:
    """One finished sequence: vLLM runs each of a request's n as its own request, and its per-request latency and
    length series count each one."""
    finish_reason: str
    e2e_latency: float             # the request's arrival to the sequence's last output, seconds
    num_prompt_tokens: int         # the whole prompt, for each sequence
    num_generation_tokens: int     # this sequence's
    # vLLM's request phases, seconds, observed for every finished sequence as vLLM's update_from_finished_request
    # makes them: arrival to first scheduled; first scheduled to first token, first to last token, first scheduled
    # to last token; and decode time per token after the first. 0 where a phase did not happen: decode time and
    # time per output token of a sequence of one token, every phase of one never scheduled (vLLM subtracts unset
    # timestamps there: a negative queue time, a prefill time of the clock's value). A sequence scheduled that ended
    # without a token (it failed) has its end as its first and last output, as vLLM's first output is.
    queued_time: float = 0.0
    prefill_time: float = 0.0
    decode_time: float = 0.0
    inference_time: float = 0.0
    mean_time_per_output_token: float = 0.0
    max_tokens: int | None = None         # the request's parameter, as sent (vLLM's request_params_max_tokens)
    num_cached_tokens: int = 0            # prompt tokens not computed (prefix cache, KV tiers)


@dataclass
class StepStats:
    """Request-level timings of one step, for the server's histograms: the engine core records first
    schedulings, the output processor latencies and finished requests."""
    first_scheduled_ids: list[str] = field(default_factory=list)   # sequences (child ids)
    # arrival to first scheduled, seconds: the start of the phases; the queue histogram observes it when the
    # sequence finishes (FinishedRequestStats.queued_time), as vLLM's
    queue_times: list[float] = field(default_factory=list)
    time_to_first_tokens: list[float] = field(default_factory=list)
    inter_token_latencies: list[float] = field(default_factory=list)
    finished: list[FinishedRequestStats] = field(default_factory=list)   # sequences
    # once per request, when its last sequence has finished: its n, and its longest sequence's tokens
    params_n: list[int] = field(default_factory=list)
    max_num_generation_tokens: list[int] = field(default_factory=list)


class StatsLogger:
    """Logs throughput and cache state every `interval` seconds (0 = never)."""

    def __init__(self, interval: float):
        self.interval = interval
        self._last_time = time.monotonic()
        self._last: SchedulerStats | None = None

    def maybe_log(self, get_stats: Callable[[], SchedulerStats]):
        now = time.monotonic()
        if self.interval <= 0 or now - self._last_time < self.interval:
            return
        self.log(get_stats())

    def log(self, stats: SchedulerStats):
        """One log line of these counts (rates since the last one)."""
        now = time.monotonic()
        dt = max(now - self._last_time, 1e-9)
        prev_prompt = self._last.num_prompt_tokens if self._last else 0
        prev_gen = self._last.num_generation_tokens if self._last else 0
        logger.info(
            "prompt %.1f tok/s, generation %.1f tok/s | running %d, waiting %d | KV blocks used %d/%d (%.1f%%) | "
            "prefix cache hit rate %.1f%% | preemptions %d",
            (stats.num_prompt_tokens - prev_prompt) / dt, (stats.num_generation_tokens - prev_gen) / dt,
            stats.num_running, stats.num_waiting, stats.num_blocks_used, stats.num_blocks_total,
            100 * stats.kv_cache_usage, 100 * stats.prefix_cache_hit_rate, stats.num_preemptions)
        if stats.spec_decode is not None and stats.spec_decode.num_drafts:
            sd = stats.spec_decode
            logger.info("speculative decoding: mean acceptance length %.2f, accepted %d of %d draft tokens, "
                        "accepted per position %s", sd.mean_acceptance_length, sd.num_accepted_tokens,
                        sd.num_draft_tokens, sd.accepted_per_pos)
        for name, tier in stats.kv_tiers.items():
            logger.info("KV tier %s: hits %d, misses %d, invalid %d, stored %.1f MiB, loaded %.1f MiB (%.1f GB/s)",
                        name, tier.hits, tier.misses, tier.invalid, tier.bytes_stored / 2**20,
                        tier.bytes_loaded / 2**20, tier.load_gb_per_s)
        self._last_time, self._last = now, stats
