"""A constrained step's bitmask fill (its accepts and xgrammar's batch fill) for N rows, alone and while another
thread runs Python (as the step thread did while the structured-output thread filled, before 6b18fd5), two ways:

  one_call   StructuredOutputManager.fill_bitmask as shipped: one batch accept, one batch fill, on the calling thread
  chunks64   the fill before it: chunks of 64 rows, each chunk's batch fill on a thread of its own while the caller
             takes the next chunk's accepts

Each xgrammar call lets the GIL go and waits up to a switch interval to get it back behind a thread running
Python, so the number of calls, not their work, sets the time there. Rows under the 8 W1 run-on JSON schemas,
each step a token drawn at random among those the row's bitmask allows; both sets of matchers take the same
tokens. Medians of alternating steps.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/structured_fill_gil.py [--rows 256] [--steps 48]
        [--tokenizer DIR]   (the Qwen3 tokenizer: .device/models/Qwen--Qwen3-0.6B)
"""
import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import xgrammar as xgr
from structured_accept_gil import Spinner, _grammar

from pagedllm.bench.schemas import RUN_ON_SCHEMAS
from pagedllm.structured_output.manager import StructuredOutputManager, flush_rows


class ChunkedFill:
    """The fill as it was at a022b60 (FILL_CHUNK 64, the batch fills on a `structured-fill` thread)."""
    def __init__(self, rows: int, vocab: int):
        self.bitmask = torch.empty(rows, (vocab + 31) // 32, dtype=torch.int32)
        self.batch = xgr.BatchGrammarMatcher(max_threads=max(1, min(8, (os.cpu_count() or 2) // 2)))
        self.filler = ThreadPoolExecutor(1)

    def fill_bitmask(self, rows):
        fills = []
        for i in range(0, len(rows), 64):
            chunk = rows[i:i + 64]
            flush_rows([g for _, g in chunk])
            fills.append(self.filler.submit(self.batch.batch_fill_next_token_bitmask, [g.matcher for _, g in chunk],
                                            self.bitmask, [j for j, _ in chunk]))
        for f in fills:
            f.result()
        return self.bitmask


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--tokenizer", default=".device/models/Qwen--Qwen3-0.6B")
    args = ap.parse_args()
    from transformers import AutoConfig, AutoTokenizer
    vocab = AutoConfig.from_pretrained(args.tokenizer).vocab_size
    info = xgr.TokenizerInfo.from_huggingface(AutoTokenizer.from_pretrained(args.tokenizer), vocab_size=vocab)
    compiled = [xgr.GrammarCompiler(info).compile_json_schema(s) for s in RUN_ON_SCHEMAS]
    fills = {"one_call": StructuredOutputManager(None, vocab, args.rows, torch.device("cpu")),
             "chunks64": ChunkedFill(args.rows, vocab)}
    grammars = {v: [_grammar(compiled[i % len(compiled)]) for i in range(args.rows)] for v in fills}
    stop_ids, rng, spinner = set(info.stop_token_ids), np.random.default_rng(0), Spinner()
    times = {(v, s): [] for v in fills for s in ("alone", "spinning")}
    masks = {}
    for step in range(args.steps):
        spinning = step % 2 == 1
        for v in (list(fills) if step % 4 < 2 else list(fills)[::-1]):
            spinner.on = spinning
            time.sleep(0.001)
            t0 = time.perf_counter()
            masks[v] = fills[v].fill_bitmask(list(enumerate(grammars[v])))[:args.rows].clone()
            dt = time.perf_counter() - t0
            spinner.on = False
            if step >= 4:
                times[(v, "spinning" if spinning else "alone")].append(dt)
        assert torch.equal(masks["one_call"], masks["chunks64"])
        bits = np.unpackbits(masks["one_call"].numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab]
        for i, row in enumerate(bits):
            allowed = np.flatnonzero(row)
            other = [t for t in allowed if t not in stop_ids]
            token = int(rng.choice(other or allowed))
            for v in fills:
                grammars[v][i].pending.append(token)
        for i, g in enumerate(grammars["one_call"]):
            if g.matcher.is_terminated():
                for v in fills:
                    grammars[v][i].matcher.reset()
                    grammars[v][i].pending.clear()
    spinner.done = True
    print(json.dumps({"rows": args.rows, "median_ms": {f"{v}/{s}": round(1e3 * float(np.median(t)), 2)
                                                        for (v, s), t in times.items()}}))


if __name__ == "__main__":
    main()
