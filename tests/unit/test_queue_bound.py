"""The waiting-queue bound counts sequences: a request adds its n (issue 14: n=2000 passed a bound of 8); with
several API processes (--api-server-count) it counts the sequences waiting in all of them."""
import multiprocessing

import pytest

from pagedllm.engine.async_llm import AsyncLLM, QueueFullError


def _engine(bound: int | None, waiting: int, shared=None) -> AsyncLLM:
    engine = object.__new__(AsyncLLM)   # the bound's check needs no engine core
    engine.max_waiting_queue_length = bound
    engine._unscheduled = {f"w{i}" for i in range(waiting)}
    engine.shared_waiting, engine._num_published = shared, 0
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


def test_the_bound_is_shared_by_several_api_processes():
    """Each process takes its places in the shared count under its lock, and gives back what it no longer has."""
    shared = multiprocessing.get_context("spawn").Value("q", 0)
    a, b = _engine(3, 0, shared), _engine(3, 0, shared)
    a._check_queue_bound(2)
    a._unscheduled.update({"a-0", "a-1"})
    a._publish_waiting()
    with pytest.raises(QueueFullError, match="2 sequences are waiting and this request adds 2"):
        b._check_queue_bound(2)
    b._check_queue_bound(1)
    b._publish_waiting()   # its request failed to enter (nothing added): the place is given back
    assert shared.value == 2
    a._unscheduled.clear()   # a's sequences were scheduled
    a._publish_waiting()
    b._check_queue_bound(3)
    assert shared.value == 3
