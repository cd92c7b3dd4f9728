"""Engine statistics: counts the scheduler keeps, and the periodic log line."""
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

logger = logging.getLogger("pagedllm")


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

    @property
    def num_blocks_used(self) -> int:
        return self.num_blocks_total - self.num_blocks_free

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


@dataclass
class FinishedRequestStats:
    finish_reasons: list[str]      # one per sequence (n)
    e2e_latency: float             # arrival to the last output, seconds
    num_prompt_tokens: int
    num_generation_tokens: int


@dataclass
class StepStats:
    """Request-level timings of one step, for the server's histograms: the engine core records first
    schedulings, the output processor latencies and finished requests."""
    first_scheduled_ids: list[str] = field(default_factory=list)   # sequences (child ids)
    queue_times: list[float] = field(default_factory=list)         # arrival to first scheduled, seconds
    time_to_first_tokens: list[float] = field(default_factory=list)
    inter_token_latencies: list[float] = field(default_factory=list)
    finished: list[FinishedRequestStats] = field(default_factory=list)


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
        stats = get_stats()
        dt = now - self._last_time
        prev_prompt = self._last.num_prompt_tokens if self._last else 0
        prev_gen = self._last.num_generation_tokens if self._last else 0
        logger.info(
            "prompt %.1f tok/s, generation %.1f tok/s | running %d, waiting %d | KV blocks used %d/%d (%.1f%%) | "
            "prefix cache hit rate %.1f%% | preemptions %d",
            (stats.num_prompt_tokens - prev_prompt) / dt, (stats.num_generation_tokens - prev_gen) / dt,
            stats.num_running, stats.num_waiting, stats.num_blocks_used, stats.num_blocks_total,
            100 * stats.kv_cache_usage, 100 * stats.prefix_cache_hit_rate, stats.num_preemptions)
        self._last_time, self._last = now, stats
