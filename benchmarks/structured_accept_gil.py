"""The deferred accepts of a constrained step, one RequestGrammar.flush a row against the fill's flush_rows (one
batch accept a chunk of rows), each alone and while another thread runs Python (as the step thread did while
the structured-output thread filled, before 6b18fd5): xgrammar lets the GIL go in each call, and a thread that
wants it back waits up to a switch interval behind one that runs Python. N rows under the 8 run-on JSON schemas,
each step a token drawn at random among those its bitmask allows; the two sets of matchers take the same tokens.
The wait shows only where the spinning thread has a core to itself: on a loaded machine the caller gets the GIL
back before the spinner wakes, and "spinning" equals "alone".

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/structured_accept_gil.py [--rows 256] [--steps 40]
        [--switch-interval 0.005] [--tokenizer DIR]
"""
import argparse
import json
import sys
import threading
import time
from concurrent.futures import Future

import numpy as np
import xgrammar as xgr

from pagedllm.bench.schemas import RUN_ON_SCHEMAS
from pagedllm.structured_output.manager import RequestGrammar, flush_rows

FILL_CHUNK = 64   # the chunks the fill took before it made one batch accept of every row

TOKENIZER = "/work/models/qwen2.5-coder-0.5b-instruct"


class Spinner:
    """A thread that runs Python while `on`; `count` says how far it got."""
    def __init__(self):
        self.on, self.count, self.done = False, 0, False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while not self.done:
            if self.on:
                self.count += 1
            else:
                time.sleep(0.0002)


def _grammar(compiled) -> RequestGrammar:
    future = Future()
    future.set_result(compiled)
    g = RequestGrammar(future, "json", 30.0)
    g.poll()
    return g


def per_row(grammars):
    for g in grammars:
        g.flush()


def by_chunks(grammars):
    for i in range(0, len(grammars), FILL_CHUNK):
        flush_rows(grammars[i:i + FILL_CHUNK])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--switch-interval", type=float, default=sys.getswitchinterval())
    ap.add_argument("--tokenizer", default=TOKENIZER)
    args = ap.parse_args()
    sys.setswitchinterval(args.switch_interval)
    from transformers import AutoConfig, AutoTokenizer
    vocab = AutoConfig.from_pretrained(args.tokenizer).vocab_size
    info = xgr.TokenizerInfo.from_huggingface(AutoTokenizer.from_pretrained(args.tokenizer), vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info)
    compiled = [compiler.compile_json_schema(s) for s in RUN_ON_SCHEMAS]
    variants = {"per_row": per_row, "by_chunks": by_chunks}
    grammars = {v: [_grammar(compiled[i % len(compiled)]) for i in range(args.rows)] for v in variants}
    stop_ids = set(info.stop_token_ids)
    bitmask, batch = xgr.allocate_token_bitmask(args.rows, vocab), xgr.BatchGrammarMatcher()
    rng = np.random.default_rng(0)
    spinner = Spinner()
    times = {(v, s): [] for v in variants for s in ("alone", "spinning")}
    for step in range(args.steps):
        batch.batch_fill_next_token_bitmask([g.matcher for g in grammars["per_row"]], bitmask)
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab]
        tokens = []
        for row in bits:
            allowed = np.flatnonzero(row)
            other = [t for t in allowed if t not in stop_ids]
            tokens.append(int(rng.choice(other or allowed)))
        spinning = step % 2 == 1
        for v in (list(variants) if step % 4 < 2 else list(variants)[::-1]):   # alternate the order
            for g, t in zip(grammars[v], tokens):
                g.pending.append(t)
            spinner.on = spinning
            time.sleep(0.001)
            t0 = time.perf_counter()
            variants[v](grammars[v])
            dt = time.perf_counter() - t0
            spinner.on = False
            assert all(g.rejected is None for g in grammars[v])
            if step >= 4:
                times[(v, "spinning" if spinning else "alone")].append(dt)
        for i, g in enumerate(grammars["per_row"]):
            if g.matcher.is_terminated():
                for v in variants:
                    grammars[v][i].matcher.reset()
    spinner.done = True
    print(json.dumps({"rows": args.rows, "switch_interval": args.switch_interval,
                      "median_ms": {f"{v}/{s}": round(1e3 * float(np.median(t)), 3) for (v, s), t in times.items()}}))


if __name__ == "__main__":
    main()
