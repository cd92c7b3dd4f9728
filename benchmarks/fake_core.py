"""`pagedllm serve` with a fake engine core, for measuring the API process alone (benchmarks/api_cost.py --fake-core).

    FAKE_STEP_MS=15 python benchmarks/fake_core.py serve MODEL_DIR ...   (the usual serve flags)

The real API process runs as always; only the core process is replaced. It loads no model: every FAKE_STEP_MS
(0: as fast as it can send) it emits one token for each running request, ids of an English text in the model's
tokenizer (so detokenizing costs what it costs on real output), and finishes each request at its max_tokens
("length"). It speaks the core's pipe protocol (core_process.py): ready, outputs with StepStats, heartbeats,
stats; to several API processes too (--api-server-count). So the API side can be driven at a GPU's event rate
(300 streams at a 15 ms step: 20,000 token events/s) on a small CPU machine.
"""
import os
import signal
import time

from pagedllm.core.messages import EngineCoreOutput
from pagedllm.engine import core_process
from pagedllm.metrics import SchedulerStats, StepStats

_TEXT = ("The quick brown fox jumps over the lazy dog while the committee reviews the annual report on "
         "regional water use, noting that 12.5% of households changed suppliers in 2025. Meanwhile, "
         "researchers in Zürich described a method for streaming text to many readers at once. ")


def run_fake_core(config, conns, log_level: int):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from pagedllm.engine.tokenizer import load_engine_tokenizer
    ids = load_engine_tokenizer(config).encode(_TEXT * 4, add_special_tokens=False)
    step_s = float(os.environ.get("FAKE_STEP_MS", "15")) / 1e3
    clients = core_process._Clients(conns)   # one pipe per API process
    clients.send_all(("ready", 100_000, {"model": config.model, "device": "fake", "dtype": "none",
                                         "load_seconds": 0.0, "num_blocks": 100_000, "block_size": 16,
                                         "capture_seconds": None, "startup_seconds": 0.0},
                      config.with_batch_defaults(False, serving=True)))   # the config it runs, as a core sends
    pulse = core_process._Pulse(clients)
    core = _FakeCore()
    next_step = time.perf_counter()
    while clients.live:
        for conn, msg in clients.receive(0 if core.running else core_process.HEARTBEAT_INTERVAL, core):
            core_process._handle(core, conn, msg, None, clients)   # the real core's handling (no LoRA calls)
        if not core.running:
            continue
        time.sleep(max(next_step - time.perf_counter(), 0))
        next_step = max(next_step + step_s, time.perf_counter())
        new, core.new = core.new, []
        clients.send_outputs(core.step(ids), StepStats(first_scheduled_ids=new, queue_times=[0.0] * len(new)))
        pulse.tick = time.monotonic()


class _FakeCore:
    def __init__(self):
        self.running: dict[str, list[int]] = {}   # request id -> [tokens left, position in ids]
        self.new: list[str] = []

    def step(self, ids: list[int]) -> list[EngineCoreOutput]:
        """One token for each running request."""
        outputs = []
        for req_id, state in list(self.running.items()):
            state[0] -= 1
            token = ids[state[1] % len(ids)]
            state[1] += 1
            finish = "length" if state[0] == 0 else None
            if finish:
                del self.running[req_id]
            outputs.append(EngineCoreOutput(req_id, [token], finish_reason=finish))
        return outputs

    def add_request(self, r):
        self.running[r.request_id] = [r.max_tokens, hash(r.request_id) % 97]
        self.new.append(r.request_id)

    def get_stats(self) -> SchedulerStats:
        return SchedulerStats(len(self.running), 0, 100_000, 100_000, 0.0, 0, 0, 0, 0, 0, 0, 0, 0.0)

    def finish_requests(self, request_ids: list[str], status):
        for req_id in request_ids:
            self.running.pop(req_id, None)


core_process.run_engine_core = run_fake_core

if __name__ == "__main__":
    from pagedllm.cli import main
    if os.environ.get("FAKE_PROFILE"):   # cProfile of the API process, written when the server stops
        import cProfile
        cProfile.run("main()", os.environ["FAKE_PROFILE"])
    else:
        main()
