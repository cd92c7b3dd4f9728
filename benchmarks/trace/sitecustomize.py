"""Latency trace of a running server, for finding where time to first token goes (a benchmark tool).

    PAGEDLLM_TRACE_DIR=/tmp/trace PYTHONPATH=benchmarks/trace:$PYTHONPATH pagedllm serve ...
    python benchmarks/trace/analyze.py /tmp/trace

Python imports sitecustomize in every process it starts, the spawned engine core included. With
PAGEDLLM_TRACE_DIR set, each process appends JSON lines to <dir>/<pid>.jsonl (line-buffered: the core
process exits without running atexit):
    {"gc": ...}     every garbage collection over 0.5 ms (generation, start, ms)
    {"step": ...}   core: one per EngineCore.step (schedule, launch and wait times; the launched step's shape)
    {"req": ...}    core: a request's arrival (API clock), receipt by the core, first scheduling, first token
    {"api": ...}    API: a request's first token handed to the output processor (each of its n sequences')
Nothing changes when the variable is unset.

With PAGEDLLM_LOG_T0 (seconds since the epoch, the command's start) set instead or too, every log line of every
process starts with the seconds since then and its pid: where start-up goes (benchmarks/serve_startup.sh).
"""
import gc
import json
import os
import sys
import time

_DIR = os.environ.get("PAGEDLLM_TRACE_DIR")


def _install():
    os.makedirs(_DIR, exist_ok=True)
    f = open(os.path.join(_DIR, f"{os.getpid()}.jsonl"), "a", buffering=1)

    def log(**rec):
        f.write(json.dumps(rec) + "\n")

    gc_start = {}

    def on_gc(phase, info):
        if phase == "start":
            gc_start["t"] = time.perf_counter()
        elif "t" in gc_start:
            ms = (time.perf_counter() - gc_start.pop("t")) * 1e3
            if ms > 0.5:
                log(gc=info["generation"], t=time.time(), ms=round(ms, 3), collected=info.get("collected"))

    gc.callbacks.append(on_gc)

    # Patched lazily: importing torch here would slow every Python process started with the variable set.
    import builtins
    real_import = builtins.__import__
    patched = set()

    def hooked_import(name, globals=None, locals=None, fromlist=(), level=0):
        module = real_import(name, globals, locals, fromlist, level)
        if len(patched) == 2 or busy:
            return module
        busy.append(1)
        try:
            _maybe_patch(name)
        finally:
            busy.pop()
        return module

    busy = []

    def _maybe_patch(name):
        if "core" not in patched and name.startswith("pagedllm.engine.core") and _loaded("pagedllm.engine.core"):
            patched.add("core")
            _patch_core(log)
        if "api" not in patched and _loaded("pagedllm.engine.output_processor"):
            patched.add("api")
            _patch_api(log)

    builtins.__import__ = hooked_import


def _loaded(name):
    return name in sys.modules and getattr(sys.modules[name], "__spec__", None) is not None \
        and hasattr(sys.modules[name], "EngineCore" if name.endswith("core") else "_record_latencies")


def _patch_core(log):
    core_mod = sys.modules["pagedllm.engine.core"]
    EngineCore = core_mod.EngineCore
    from pagedllm.runner.model_runner import ModelRunner, PendingOutput
    from pagedllm.core.scheduler import Scheduler

    cur = {}
    seen_first = set()
    clock = time.perf_counter

    def wrap(cls, name, key):
        fn = getattr(cls, name)

        def wrapper(*args, **kwargs):
            t = clock()
            out = fn(*args, **kwargs)
            cur[key] = cur.get(key, 0.0) + clock() - t
            if key == "schedule":
                cur["tokens"] = out.total_num_scheduled_tokens
                cur["rows"] = len(out.num_scheduled_tokens)
                cur["new"] = [n.req_id for n in out.new_reqs]
            return out
        setattr(cls, name, wrapper)

    wrap(Scheduler, "schedule", "schedule")
    wrap(ModelRunner, "execute_async", "launch")
    wrap(PendingOutput, "result", "wait")
    wrap(Scheduler, "update_from_output", "update")

    add = EngineCore.add_request

    def add_request(self, r):
        log(req=r.request_id, arrival=r.arrival_time, recv=time.time(), prompt=len(r.prompt_token_ids))
        return add(self, r)
    EngineCore.add_request = add_request

    step = EngineCore.step

    def traced_step(self):
        cur.clear()
        t0 = time.time()
        done = step(self)
        t1 = time.time()
        if cur.get("new"):
            for rid in cur["new"]:
                log(req=rid, scheduled=t0)
        first = []
        if done is not None:
            for o in done[0]:
                if o.new_token_ids and o.req_id not in seen_first:
                    seen_first.add(o.req_id)
                    first.append(o.req_id)
        for rid in first:
            log(req=rid, first_token=t1)
        log(step=round(t0, 6), dur_ms=round((t1 - t0) * 1e3, 3), tokens=cur.get("tokens"), rows=cur.get("rows"),
            new=len(cur.get("new") or []), **{k: round(v * 1e3, 3) for k, v in cur.items()
                                              if k in ("schedule", "launch", "wait", "update")})
        return done
    EngineCore.step = traced_step


def _patch_api(log):
    op = sys.modules["pagedllm.engine.output_processor"]
    record = op._record_latencies

    def traced(arrival_time, seq, out, now, stats):   # each of a request's n sequences (its own req_id)
        if out.new_token_ids and seq.first_token_time is None:
            log(api=out.req_id, arrival=arrival_time, first_token=now)
        return record(arrival_time, seq, out, now, stats)
    op._record_latencies = traced


def _stamp_logs(t0: float):
    import logging
    plain = logging.Formatter.format

    def stamped(self, record):
        return f"[{record.created - t0:6.2f} s pid {os.getpid()}] " + plain(self, record)
    logging.Formatter.format = stamped


if _DIR:
    _install()
if os.environ.get("PAGEDLLM_LOG_T0"):
    _stamp_logs(float(os.environ["PAGEDLLM_LOG_T0"]))
