"""--enable-per-request-metrics (vLLM 0.26's): a chat or completions answer's `metrics`, its one sequence's timings
in milliseconds, from the engine's RequestMetrics (the output processor's clock):

    arrival ── queue ──► first scheduled ── ttft ──► first token ── generation ──► last token
                         └────────────── tokens_per_second counts over this ──────────────┘

A field is None where a timestamp it needs is missing (a request that never ran; beam search keeps none)."""
from pagedllm.outputs import RequestMetrics


def timing_metrics(m: RequestMetrics | None, num_generated: int) -> dict:
    """vLLM's PerRequestTimingMetrics fields. As vLLM's, time_to_first_token_ms counts from the first step (not the
    arrival: queue_time_ms is apart); mean_itl_ms needs two tokens; tokens_per_second includes the prefill."""
    scheduled = first = last = queued = None
    if m is not None:
        queued, scheduled, first, last = m.arrival_time, m.first_scheduled_time, m.first_token_time, m.last_token_time
    out = {"time_to_first_token_ms": _ms(first, scheduled), "generation_time_ms": _ms(last, first),
           "queue_time_ms": _ms(scheduled, queued), "mean_itl_ms": None, "tokens_per_second": None}
    if out["generation_time_ms"] is not None and num_generated > 1:
        out["mean_itl_ms"] = out["generation_time_ms"] / (num_generated - 1)
    inference_ms = _ms(last, scheduled)
    if inference_ms:   # None or 0: no rate
        out["tokens_per_second"] = num_generated / inference_ms * 1000
    return out


def _ms(end: float | None, start: float | None) -> float | None:
    return None if end is None or start is None else (end - start) * 1000


def streamed(metrics: dict) -> dict:
    """A stream's usage chunk leaves the None fields out (vLLM's exclude_none there; its answer keeps them)."""
    return {k: v for k, v in metrics.items() if v is not None}
