"""`pagedllm serve` with a fake engine core, for measuring the API process alone (benchmarks/api_cost.py --fake-core).

    FAKE_STEP_MS=15 python benchmarks/fake_core.py serve MODEL_DIR ...   (the usual serve flags)

The real API process runs as always; only the core process is replaced. It loads no model: every FAKE_STEP_MS
(0: as fast as it can send) it emits one token for each running request, ids of an English text in the model's
tokenizer (so detokenizing costs what it costs on real output), and finishes each request at its max_tokens
("length"). It speaks the core's pipe protocol (core_process.py): ready, outputs with StepStats, heartbeats,
stats. So one API process can be driven at a GPU's event rate (300 streams at a 15 ms step: 20,000 token
events/s) on a small CPU machine.
"""
import os
import signal
import time

from pagedllm.engine import core_process
from pagedllm.metrics import SchedulerStats, StepStats

_TEXT = ("The quick brown fox jumps over the lazy dog while the committee reviews the annual report on "
         "regional water use, noting that 12.5% of households changed suppliers in 2025. Meanwhile, "
         "researchers in Zürich described a method for streaming text to many readers at once. ")


def run_fake_core(config, conn, log_level: int):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from pagedllm.engine.tokenizer import load_engine_tokenizer
    ids = load_engine_tokenizer(config).encode(_TEXT * 4, add_special_tokens=False)
    step_s = float(os.environ.get("FAKE_STEP_MS", "15")) / 1e3
    conn = core_process._SharedConn(conn)
    conn.send(("ready", 100_000, {"model": config.model, "device": "fake", "dtype": "none", "load_seconds": 0.0,
                                  "num_blocks": 100_000, "block_size": 16, "capture_seconds": None,
                                  "startup_seconds": 0.0}))
    pulse = core_process._Pulse(conn)
    running: dict[str, list[int]] = {}   # request id -> [tokens left, position in ids]
    new: list[str] = []
    next_step = time.perf_counter()
    try:
        while True:
            while conn.poll(0 if running else core_process.HEARTBEAT_INTERVAL):
                if not _handle(conn.recv(), conn, running, new):
                    return
            if not running:
                continue
            time.sleep(max(next_step - time.perf_counter(), 0))
            next_step = max(next_step + step_s, time.perf_counter())
            conn.send(("outputs", _step(running, ids), StepStats(first_scheduled_ids=new[:])))
            new.clear()
            pulse.tick = time.monotonic()
    except (EOFError, BrokenPipeError):
        return


def _step(running: dict[str, list[int]], ids: list[int]) -> list[tuple]:
    """One token for each running request: EngineCoreOutput rows (req_id, new_token_ids, logprobs,
    prompt_logprobs, finish_reason, stop_reason, num_cached_tokens, error, bad_request)."""
    rows = []
    for req_id, state in list(running.items()):
        state[0] -= 1
        token = ids[state[1] % len(ids)]
        state[1] += 1
        finish = "length" if state[0] == 0 else None
        if finish:
            del running[req_id]
        rows.append((req_id, [token], None, None, finish, None, 0, None, False))
    return rows


def _handle(msg: tuple, conn, running: dict, new: list) -> bool:
    if msg[0] == "add":
        for r in msg[1]:
            running[r.request_id] = [r.max_tokens, hash(r.request_id) % 97]
            new.append(r.request_id)
    elif msg[0] == "finish":
        for req_id in msg[1]:
            running.pop(req_id, None)
    elif msg[0] == "stats":
        conn.send(("stats", SchedulerStats(len(running), 0, 100_000, 100_000, 0.0, 0, 0, 0, 0, 0, 0, 0, 0.0)))
    elif msg[0] == "shutdown":
        return False
    return True


core_process.run_engine_core = run_fake_core

if __name__ == "__main__":
    from pagedllm.cli import main
    if os.environ.get("FAKE_PROFILE"):   # cProfile of the API process, written when the server stops
        import cProfile
        cProfile.run("main()", os.environ["FAKE_PROFILE"])
    else:
        main()
