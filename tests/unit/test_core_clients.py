"""The engine core's pipes to several API processes (core_process._Clients): each request's outputs and first
schedulings go down the pipe that added it (also for one that finishes in its first step: its API process must
learn it was scheduled, or its waiting-queue count never drops), a stats reply down the pipe that asked, and a
pipe that closes takes its requests with it (aborted). With one pipe nothing is routed."""
import multiprocessing

from pagedllm.core.messages import EngineCoreOutput
from pagedllm.engine.core_process import _Clients, _handle
from pagedllm.metrics import StepStats
from pagedllm.request import RequestStatus


class _FakeCore:
    def __init__(self):
        self.added, self.finished = [], []

    def add_request(self, request):
        self.added.append(request.request_id)

    def finish_requests(self, request_ids, status):
        self.finished.append((sorted(request_ids), status))

    def get_stats(self):
        return "stats"


class _Req:
    def __init__(self, request_id: str):
        self.request_id = request_id


def _pipes(n: int):
    pairs = [multiprocessing.Pipe() for _ in range(n)]
    return [api for api, _ in pairs], _Clients([core for _, core in pairs])


def _drain(conn) -> list:
    msgs = []
    while conn.poll(0.2):
        msgs.append(conn.recv())
    return msgs


def _add(clients, core, api_ends, index: int, ids: list[str]):
    api_ends[index].send(("add", [_Req(i) for i in ids]))
    for conn, msg in clients.receive(1.0, core):
        _handle(core, conn, msg, None, clients)


def test_outputs_go_to_the_pipe_that_added_the_request():
    api, clients = _pipes(2)
    core = _FakeCore()
    _add(clients, core, api, 0, ["a-0", "a-1"])
    _add(clients, core, api, 1, ["b-0"])
    assert core.added == ["a-0", "a-1", "b-0"]
    outputs = [EngineCoreOutput("a-0", [5]), EngineCoreOutput("b-0", [6], finish_reason="length"),
               EngineCoreOutput("a-1", [7])]
    clients.send_outputs(outputs, StepStats(first_scheduled_ids=["b-0", "a-1"], queue_times=[0.5, 0.25]))
    (kind, rows, stats), = _drain(api[0])
    assert kind == "outputs" and [r[0] for r in rows] == ["a-0", "a-1"]
    assert stats.first_scheduled_ids == ["a-1"] and stats.queue_times == [0.25]
    (_, rows, stats), = _drain(api[1])
    assert [r[:2] for r in rows] == [("b-0", [6])] and stats.first_scheduled_ids == ["b-0"]
    assert "b-0" not in clients.owner   # finished: forgotten


def test_stats_reply_to_the_asking_pipe_and_a_closed_pipe_aborts_its_requests():
    api, clients = _pipes(2)
    core = _FakeCore()
    _add(clients, core, api, 0, ["a-0"])
    _add(clients, core, api, 1, ["b-0", "b-1"])
    api[1].send(("stats",))
    for conn, msg in clients.receive(1.0, core):
        _handle(core, conn, msg, None, clients)
    assert _drain(api[1]) == [("stats", "stats")] and _drain(api[0]) == []
    api[1].close()   # that API process is gone
    assert clients.receive(1.0, core) == []
    assert core.finished == [(["b-0", "b-1"], RequestStatus.FINISHED_ABORTED)]
    assert len(clients.live) == 1 and set(clients.owner) == {"a-0"}
    clients.send_outputs([EngineCoreOutput("b-0", [1]), EngineCoreOutput("a-0", [2])], StepStats())
    (_, rows, _), = _drain(api[0])
    assert [r[0] for r in rows] == ["a-0"]


def test_one_pipe_is_not_routed():
    api, clients = _pipes(1)
    core = _FakeCore()
    _add(clients, core, api, 0, ["r-0"])
    assert clients.owner == {}
    clients.send_outputs([EngineCoreOutput("unknown", [3])], StepStats())   # everything goes down the one pipe
    (_, rows, _), = _drain(api[0])
    assert [r[0] for r in rows] == ["unknown"]
    api[0].send(("shutdown",))
    for conn, msg in clients.receive(1.0, core):
        _handle(core, conn, msg, None, clients)
    assert clients.live == [] and core.finished == []
