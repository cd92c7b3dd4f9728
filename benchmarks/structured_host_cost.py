"""Host time a constrained step adds on the engine core's step thread, without a model or a GPU: N requests
under the 8 W1 run-on JSON schemas (round-robin, as structured_cost.py), each step a token drawn at random among
those the row's bitmask allows (W1's dummy weights at temperature 1 sample near-uniformly too). Per step, the
work of the constrained path that the step thread does:
  - check_stop: Scheduler._check_stop for every row (its matcher's accept, the stop checks), minus the same
    loop for the same requests without a grammar;
  - rows: the engine core's list of rows under a live grammar;
  - fill: the bitmask fill (manager.fill_bitmask: its deferred accepts in one batch accept, and xgrammar's
    batch fill on several threads); with --split-flush the accepts run first, timed apart (flush).
All of it runs on the step thread (since 6b18fd5; the fill ran on a thread of its own before).

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/structured_host_cost.py [--rows 256] [--steps 64]
        [--tokenizer DIR]   (the GPU machine: .device/models/Qwen--Qwen3-0.6B)
"""
import argparse
import json
import time

import numpy as np
import torch

from pagedllm.bench.schemas import RUN_ON_SCHEMAS
from pagedllm.core.scheduler import Scheduler
from pagedllm.request import Request
from pagedllm.sampling_params import SamplingParams
from pagedllm.structured_output.compiler import GrammarCompilePool
from pagedllm.structured_output.manager import StructuredOutputManager, flush_rows, live_grammar_rows
from pagedllm.structured_output.params import StructuredOutputsParams

TOKENIZER = "/work/models/qwen2.5-coder-0.5b-instruct"


def _manager(rows: int, tokenizer: str) -> StructuredOutputManager:
    from transformers import AutoConfig, AutoTokenizer
    vocab = AutoConfig.from_pretrained(tokenizer).vocab_size
    tok = AutoTokenizer.from_pretrained(tokenizer)
    pool = GrammarCompilePool(lambda: tok, vocab, lambda t: {t.eos_token_id})
    return StructuredOutputManager(pool, vocab, rows, torch.device("cpu"))


def _request(manager, i: int, constrained: bool) -> Request:
    r = Request(f"r{i}", [1] * 8, SamplingParams(ignore_eos=True, max_tokens=10**6), 10**6, 16)
    if constrained:
        r.grammar = manager.request_grammar(StructuredOutputsParams(json=RUN_ON_SCHEMAS[i % len(RUN_ON_SCHEMAS)]))
        r.grammar.future.result()
        r.grammar.poll()
    return r


def _draw(bitmask: torch.Tensor, n: int, stop_ids: set[int], rng) -> list[int]:
    """A token each row's bitmask allows (a stop token only where nothing else is allowed)."""
    bits = np.unpackbits(bitmask[:n].numpy().view(np.uint8), axis=1, bitorder="little")
    out = []
    for row in bits:
        allowed = np.flatnonzero(row)
        other = allowed[~np.isin(allowed, list(stop_ids))]
        out.append(int(rng.choice(other if len(other) else allowed)))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--tokenizer", default=TOKENIZER)
    ap.add_argument("--split-flush", action="store_true", help="time the accepts apart from the batch fill")
    args = ap.parse_args()
    manager = _manager(args.rows, args.tokenizer)
    sched = Scheduler.__new__(Scheduler)
    sched.max_model_len = 10**7
    reqs = [_request(manager, i, True) for i in range(args.rows)]
    plain = [_request(manager, i, False) for i in range(args.rows)]
    by_id = {r.request_id: r for r in reqs}
    stop_ids = set(manager.pool.stop_ids)
    rng = np.random.default_rng(0)

    class Row:   # the runner's row: a req_id
        def __init__(self, req_id):
            self.req_id = req_id
    pending_rows = [Row(r.request_id) for r in reqs]
    times = {"check_stop": [], "rows": [], "flush": [], "fill": []}
    rows = live_grammar_rows(pending_rows, by_id)
    bitmask = manager.fill_bitmask(rows)
    all_tokens, restarts = [], 0
    for step in range(args.warmup + args.steps):
        tokens = _draw(bitmask, args.rows, stop_ids, rng)
        all_tokens.append(tokens)
        t0 = time.perf_counter()
        for r, t in zip(reqs, tokens):
            r.append_output_token_id(t)
            sched._check_stop(r, t)
        t1 = time.perf_counter()
        for r, t in zip(plain, tokens):
            r.append_output_token_id(t)
            sched._check_stop(r, t)
        t2 = time.perf_counter()
        for i, r in enumerate(reqs):   # a finished answer: a new request of the same schema takes its row
            assert r.error is None, r.error
            if r.status.finished:
                reqs[i] = by_id[r.request_id] = _request(manager, i, True)
                restarts += 1
        check_stop = (t1 - t0) - (t2 - t1)   # the loop without grammars subtracted
        t2 = time.perf_counter()   # the restarts are not the engine's work
        rows = live_grammar_rows(pending_rows, by_id)
        t3 = time.perf_counter()
        if args.split_flush:   # as the fill takes them: one batch accept
            flush_rows([g for _, g in rows])
        t35 = time.perf_counter()
        bitmask = manager.fill_bitmask(rows)
        t4 = time.perf_counter()
        if step >= args.warmup:
            for k, v in (("check_stop", check_stop), ("rows", t3 - t2), ("flush", t35 - t3), ("fill", t4 - t35)):
                times[k].append(v)
    ms = {k: round(1e3 * float(np.median(v)), 3) for k, v in times.items()}   # median: the CPU is shared
    digest = hash(tuple(map(tuple, all_tokens))) & 0xFFFFFFFF   # equal before/after: the same tokens
    print(json.dumps({"rows": args.rows, "steps": args.steps, "median_ms_per_step": ms,
                      "total_ms": round(sum(ms.values()), 3),
                      "restarts": restarts, "tokens_digest": digest}))


if __name__ == "__main__":
    main()
