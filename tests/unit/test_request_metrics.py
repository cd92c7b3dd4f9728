"""--enable-per-request-metrics' arithmetic (vLLM 0.26's build_per_request_timing_metrics) from RequestMetrics."""
import pytest

from pagedllm.outputs import RequestMetrics
from pagedllm.server.request_metrics import streamed, timing_metrics


def test_timings_count_from_the_first_step():
    m = RequestMetrics(10.0, first_scheduled_time=10.5, first_token_time=11.0, last_token_time=13.0)
    assert timing_metrics(m, 5) == pytest.approx({"time_to_first_token_ms": 500.0, "generation_time_ms": 2000.0,
                                                   "queue_time_ms": 500.0, "mean_itl_ms": 500.0,
                                                   "tokens_per_second": 5 / 2.5})


def test_missing_timestamps_leave_their_fields_none():
    """One token has no inter-token gap; a request that never ran (beam search keeps no timings) has none."""
    one = timing_metrics(RequestMetrics(1.0, 1.0, 2.0, 2.0), 1)
    assert one["mean_itl_ms"] is None and one["generation_time_ms"] == 0.0
    assert set(streamed(one)) == {"time_to_first_token_ms", "generation_time_ms", "queue_time_ms",
                                  "tokens_per_second"}
    assert set(timing_metrics(RequestMetrics(1.0), 0).values()) == {None}
    assert set(timing_metrics(None, 3).values()) == {None}
