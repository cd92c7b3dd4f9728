"""observe_all adds a step's values to a histogram through prometheus_client's internals: it must expose exactly
what observe() one value at a time does (bucket bounds included), or fall back to observe()."""
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from pagedllm.server.metrics import observe_all

BUCKETS = (0.01, 0.1, 1.0, 10.0)


def _exposed(values, batched: bool) -> list[str]:
    registry = CollectorRegistry()
    h = Histogram("latency_seconds", "a latency", buckets=BUCKETS, registry=registry)
    if batched:
        observe_all(h, values)
    else:
        for v in values:
            h.observe(v)
    return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]


def test_observe_all_matches_observe_one_by_one():
    values = [0.0, 0.01, 0.010001, 0.05, 0.1, 0.5, 1.0, 3.0, 10.0, 10.5, 1e6, 0.01]   # bounds themselves too
    assert _exposed(values, batched=True) == _exposed(values, batched=False)
    for few in ([], [0.2], [0.01, 20.0]):           # short lists take observe()
        assert _exposed(few, batched=True) == _exposed(few, batched=False)
