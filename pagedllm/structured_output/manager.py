"""Per-request grammar state and the step's token bitmask.

Each constrained request holds a RequestGrammar: the future of its compiled grammar, then a matcher that
takes every token the request keeps (Scheduler.update_from_output), so that the matcher always stands where the
request's tokens end (preemption and resume change nothing: the tokens stay). Each step, after the step before
it has been applied, StructuredOutputManager.fill_bitmask writes the allowed tokens of the rows that sample
under a constraint into a host bitmask (one batch accept, one batch fill on xgrammar's threads), while the
device runs the step's forward; the runner copies it over and applies it before sampling. The kept
tokens' accepts wait for the fill too (RequestGrammar.accept): only a stop token can end a grammar, so the
scheduler's stop checks need the matcher for stop tokens alone.
"""
import os
import time
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import torch

from pagedllm.structured_output.compiler import GrammarCompilePool
from pagedllm.structured_output.params import StructuredOutputsParams


class RequestGrammar:
    def __init__(self, future: Future, kind: str, timeout: float, waits_for: int | None = None,
                 opens_with: int | None = None):
        self.future = future
        self.waits_for = waits_for   # the constraint starts after this token (reasoning's end); None: started
        # The first token decides (SamplingParams.reasoning_first_token_decides): it may be this one (the
        # reasoning's start), which keeps the wait for waits_for, or one the grammar allows, which starts it
        self.opens_with = opens_with
        self.kind = kind
        self.timeout = timeout
        self.matcher = None       # once compiled
        self.error: str | None = None
        self.pending: list[int] = []   # kept tokens the matcher has not taken yet (flush)
        self.terminated = False   # the grammar is complete and a stop token was accepted: nothing may follow
        self.rejected: int | None = None   # a kept token the matcher refused (an engine bug)
        # Its last bitmask allowed no token, not even a stop token: the constraint has no text from here (a
        # regex like [^\s\S]), so what the row sampled under it is noise, never to be kept (the scheduler).
        self.dead = False
        self._stop_ids: frozenset[int] = frozenset()

    @property
    def masks(self) -> bool:
        """Its row samples under the bitmask: the constraint has started (or opens_with's choice is due) and is
        not complete."""
        return (self.waits_for is None or self.opens_with is not None) and not self.terminated

    def poll(self) -> bool:
        """True once the grammar is compiled (the matcher is built then); False while it compiles, or when
        it failed (self.error says why: a compile error, or no result within the time limit)."""
        if self.matcher is not None:
            return True
        if self.error is None and self.future.done():
            e = self.future.exception()
            if e is None:
                import xgrammar as xgr
                self.matcher = xgr.GrammarMatcher(self.future.result())
                self._stop_ids = frozenset(self.matcher.stop_token_ids)
                return True
            self.error = str(e) if isinstance(e, ValueError) else f"structured_outputs.{self.kind}: {e!r}"
        elif self.error is None and time.monotonic() > compile_deadline(self.future, self.timeout):
            self.error = (f"structured_outputs.{self.kind} took longer than the time limit to compile "
                          f"({self.timeout:g} s, --structured-outputs-compile-timeout)")
        return False

    def accept(self, token: int) -> bool:
        """Takes a kept token. A stop token is accepted now (it may end the grammar: the scheduler reads
        `terminated` next); any other waits in `pending` for flush(), which the next bitmask fill runs off the
        step thread (an xgrammar matcher without terminate_without_stop_token ends on a stop token only).
        False: the matcher refused this token, or one before it at the last flush."""
        if self.opens_with is not None:   # the first token: the reasoning's start, or the grammar's first
            opened, self.opens_with = token == self.opens_with, None
            if opened:
                return True
            self.waits_for = None
        if self.waits_for is not None:   # free text until that token, which starts the constraint
            if token == self.waits_for:
                self.waits_for = None
            return True
        if token not in self._stop_ids:
            self.pending.append(token)
            return self.rejected is None
        if not self.flush():
            return False
        if not self.matcher.accept_token(token):
            self.rejected = token
            return False
        self.terminated = self.matcher.is_terminated()
        return True

    def flush(self) -> bool:
        """The matcher takes the pending tokens, in order; False once one was refused."""
        if self.pending and self.rejected is None:
            for token in self.pending:
                if not self.matcher.accept_token(token):
                    self.rejected = token
                    break
        self.pending.clear()
        return self.rejected is None


def flush_rows(grammars: list[RequestGrammar]) -> None:
    """RequestGrammar.flush of each grammar, with the rows that keep one token (nearly all of them: more come
    from speculative decoding) taken by one batch accept. Each xgrammar call lets the GIL go (tvm-ffi does by
    default), and gets it back only after up to a switch interval when another thread runs Python meanwhile
    (the step thread): 256 rows behind such a thread, 5 ms interval (benchmarks/structured_accept_gil.py, CPU),
    took 524 ms one by one and 12 ms by chunks of 64 (the H200's host: 1,164 and 21.8 ms); alone, 1.50 and
    1.25 ms. xgrammar's public batch_accept_token reads its result back one element at a time (two calls an
    element: 0.55 ms of 256 rows, and as many GIL releases), so the call is made below it, and only
    `0 in result` read back."""
    singles, tokens = [], []
    for g in grammars:
        if len(g.pending) == 1 and g.rejected is None:
            singles.append(g)
            tokens.append(g.pending[0])
        elif g.pending:
            g.flush()
    if not singles:
        return
    try:   # below xgrammar's public API (0.2.9): another release may lay it out otherwise
        from xgrammar.base import _core
        accepted = _core.BatchGrammarMatcher.batch_accept_token([g.matcher._handle for g in singles], tokens, False)
    except (ImportError, AttributeError):
        for g in singles:
            g.flush()
        return
    if 0 in accepted:   # an engine bug: find the rows
        for g, ok in zip(singles, list(accepted)):
            if not ok:
                g.rejected = g.pending[0]
    for g in singles:
        g.pending.clear()


@dataclass
class BitmaskStats:
    """Host time filling bitmasks, and the steps whose forward was still running when the fill ended (CUDA:
    the fill was hidden behind the device)."""
    num_steps: int = 0
    fill_seconds: float = 0.0
    num_hidden: int = 0

    def record(self, seconds: float, forward_done) -> None:
        self.num_steps += 1
        self.fill_seconds += seconds
        self.num_hidden += forward_done is not None and not forward_done.query()


def live_grammar_rows(pending_rows, requests: dict) -> list[tuple[int, "RequestGrammar"]]:
    """(row, grammar) of a step's sampled rows whose request is still there under a grammar started and not yet
    complete (a request that ended meanwhile, or whose grammar is complete, samples unmasked: its token is
    dropped; one whose grammar waits for its start token samples freely)."""
    rows = []
    for j, r in enumerate(pending_rows):
        req = requests.get(r.req_id)
        if req is not None and req.grammar is not None and req.grammar.masks:
            rows.append((j, req.grammar))
    return rows


def compile_deadline(future: Future, timeout: float) -> float:
    """The limit counts from the compile's start (GrammarCompilePool sets `started`): the engine's one-time
    set-up (xgrammar's import, the tokenizer's info) and a queue behind other compiles are not the constraint's
    fault. Not started yet: no deadline."""
    started = getattr(future, "started", None)
    return float("inf") if started is None else started + timeout


class StructuredOutputManager:
    def __init__(self, pool: GrammarCompilePool, vocab_size: int, max_num_seqs: int, device: torch.device):
        self.pool = pool
        self.vocab_size = vocab_size
        self.max_num_seqs = max_num_seqs
        self.device = device
        self._bitmask: torch.Tensor | None = None   # host, one row per sampled row of a step
        self._batch = None
        self.stats = BitmaskStats()

    def request_grammar(self, params: StructuredOutputsParams, after_token: int | None = None,
                        opens_with: int | None = None) -> RequestGrammar:
        """after_token: the grammar starts after this token (SamplingParams.reasoning_end_token_id); opens_with:
        the first token decides whether it waits for it (RequestGrammar.opens_with)."""
        return RequestGrammar(self.pool.submit(params), params.kind, self.pool.timeout, after_token, opens_with)

    def fill_bitmask(self, rows: list[tuple[int, RequestGrammar]]) -> torch.Tensor:
        """Writes the allowed tokens of each (sampled row, grammar) into that row of the host bitmask, after
        the matchers have taken their pending tokens: one batch accept, then one batch fill (xgrammar's threads),
        both on the calling thread. Why not more calls (chunks, or the fills on a thread of their own, as
        before): each xgrammar call lets the GIL go and, while the step thread runs Python, gets it back only
        after up to a switch interval. 256 rows on 2 cores (benchmarks/structured_fill_gil.py, three runs):
        5.1-5.7 ms alone, as by chunks (5.0-5.5), but 36.4-36.6 ms behind a thread running Python against
        55.7-62.6. On the H200 host the chunked fill took 1.9-2.2 ms a step on one machine and 4.1 on another."""
        if self._bitmask is None:
            import xgrammar as xgr
            words = (self.vocab_size + 31) // 32
            self._bitmask = torch.empty(self.max_num_seqs, words, dtype=torch.int32,
                                        pin_memory=self.device.type == "cuda")
            self._batch = xgr.BatchGrammarMatcher(max_threads=max(1, min(8, (os.cpu_count() or 2) // 2)))
        indices = [j for j, _ in rows]
        flush_rows([g for _, g in rows])
        self._batch.batch_fill_next_token_bitmask([g.matcher for _, g in rows], self._bitmask, indices)
        words = self._bitmask.numpy().view(np.uint32)
        for j, g in rows:   # a first token that may also open the reasoning (RequestGrammar.opens_with)
            if g.opens_with is not None:
                words[j, g.opens_with >> 5] |= np.uint32(1 << (g.opens_with & 31))
        # Rows left no token (numpy: 0.4 ms for 256 rows of a 150k vocabulary on the 2-core dev CPU; torch's
        # any() took 5-8 ms there)
        for (_, g), ok in zip(rows, self._bitmask.numpy()[indices].any(axis=1).tolist()):
            g.dead = not ok
        return self._bitmask
