"""The scheduler with requests waiting for their grammar (structured output), on fake sizes without a model: a
request whose grammar compiles is skipped and later requests run; one whose compile failed ends with a
bad-request error; the matcher accepts each kept token and its grammar's end ends the request."""
from test_scheduler import add, make_scheduler, step

from pagedllm.request import RequestStatus


class FakeGrammar:
    """RequestGrammar's interface: compiling until `ready` is set, or failed with `error`."""
    def __init__(self, end_after: int = 100):
        self.ready, self.error, self.matcher, self.dead = False, None, None, False
        self.accepted: list[int] = []
        self.end_after = end_after

    def poll(self) -> bool:
        if self.ready:
            self.matcher = object()
        return self.ready

    def accept(self, token: int) -> bool:
        self.accepted.append(token)
        return True

    @property
    def terminated(self) -> bool:
        return len(self.accepted) >= self.end_after


def test_a_request_waiting_for_its_grammar_lets_later_ones_run():
    sched = make_scheduler()
    a = add(sched, "a", 5)
    a.grammar = FakeGrammar()
    sched.compiling.append(a)   # as add_request does for a request with a grammar
    add(sched, "b", 5)
    assert sched.check_grammars() == []
    assert (sched.make_stats().num_waiting, sched.make_stats().num_waiting_deferred) == (2, 1)
    out, _ = step(sched)
    assert list(out.num_scheduled_tokens) == ["b"] and a.status == RequestStatus.WAITING
    assert sched.make_stats().num_waiting_deferred == 1   # vLLM's "deferred" waiting reason (/metrics)
    a.grammar.ready = True
    assert sched.check_grammars() == [] and sched.compiling == []
    out, _ = step(sched)
    assert "a" in out.num_scheduled_tokens


def test_a_failed_compile_ends_its_request_as_a_bad_request():
    sched = make_scheduler()
    a = add(sched, "a", 5)
    a.grammar = FakeGrammar()
    sched.compiling.append(a)
    a.grammar.error = "structured_outputs.json could not be compiled: bad"
    [out] = sched.check_grammars()
    assert (out.req_id, out.finish_reason, out.bad_request) == ("a", "error", True)
    assert out.error.startswith("structured_outputs.json") and "a" not in sched.requests and not sched.waiting


def test_the_matcher_follows_the_tokens_and_its_end_stops_the_request():
    sched = make_scheduler()
    a = add(sched, "a", 5, max_tokens=50)      # ignore_eos: only the grammar's end stops it
    a.grammar = FakeGrammar(end_after=3)
    a.grammar.ready = True
    a.grammar.poll()
    for _ in range(10):
        if not sched.has_unfinished_requests():
            break
        step(sched)
    assert a.grammar.accepted == [7, 7, 7] and a.status == RequestStatus.FINISHED_STOPPED
