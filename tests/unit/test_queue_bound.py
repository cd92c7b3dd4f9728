"""The waiting-queue bound counts sequences: a request adds its n (issue 14: n=2000 passed a bound of 8)."""
import pytest

from pagedllm.engine.async_llm import AsyncLLM, QueueFullError


def _engine(bound: int | None, waiting: int) -> AsyncLLM:
    engine = object.__new__(AsyncLLM)   # the bound's check needs no engine core
    engine.max_waiting_queue_length = bound
    engine._unscheduled = {f"w{i}" for i in range(waiting)}
    return engine


def test_a_request_counts_its_n_sequences():
    _engine(8, 5)._check_queue_bound(3)   # 5 + 3 = 8: at the bound, taken
    with pytest.raises(QueueFullError, match="5 sequences are waiting and this request adds 4"):
        _engine(8, 5)._check_queue_bound(4)
    _engine(None, 10**6)._check_queue_bound(10**4)   # no bound


def test_n_above_the_bound_is_a_value_error_naming_n():
    """It could never be admitted, even with the queue empty: a 400 naming n, not a 503 to retry."""
    with pytest.raises(ValueError, match=r"SamplingParams\.n must be at most max_waiting_queue_length \(8\)"):
        _engine(8, 0)._check_queue_bound(2000)
