"""/metrics against vLLM's PrometheusStatLogger: the series its dashboards and alerts read, with its names (the
`pagedllm:` prefix for `vllm:`), labels, buckets and meaning. Over StepStats and SchedulerStats, no engine."""
import re

from pagedllm.metrics import FinishedRequestStats, SchedulerStats, SpecDecodeStats, StepStats
from pagedllm.server.metrics import ServerMetrics


def scheduler_stats(**kw) -> SchedulerStats:
    fields = dict(num_running=2, num_waiting=1, num_blocks_total=10, num_blocks_free=4, kv_cache_usage=0.6,
                  prefix_cache_queries=64, prefix_cache_hits=32, num_preemptions=1, num_prompt_tokens=32,
                  num_generation_tokens=7, peak_blocks=6, peak_running=2, kv_waste_at_peak=0.1)
    return SchedulerStats(**{**fields, **kw})


def exposed(metrics: ServerMetrics, stats: SchedulerStats | None = None) -> str:
    return metrics.render(stats).decode()


def samples(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if re.match(re.escape(name) + r"[{ ]", line)]


def test_every_series_has_vllms_engine_label():
    """vLLM labels every series model_name and engine (its core's index); a query that selects or sums by engine
    finds nothing without it. One core here: engine="0"."""
    metrics = ServerMetrics("m")
    metrics.record(StepStats(queue_times=[0.1], time_to_first_tokens=[0.2], inter_token_latencies=[0.01],
                             finished=[FinishedRequestStats(["stop"], 0.5, 3, 4)]))
    text = exposed(metrics, scheduler_stats(spec_decode=SpecDecodeStats(2, 4, 3, [2, 1])))
    series = [line for line in text.splitlines() if line.startswith("pagedllm:")]
    assert len(series) > 40
    assert [line for line in series if 'engine="0"' not in line or 'model_name="m"' not in line] == []
    assert 'pagedllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 1.0' in text
    assert 'pagedllm:num_requests_running{engine="0",model_name="m"} 2.0' in text
