"""AsyncLLM: the online engine. Requests come and go at any time; outputs stream as tokens arrive.

The engine core (scheduler + model runner) runs in its own process (see core_process.py); this object lives
in the API process's event loop and does the rest: tokenize and validate (InputProcessor), detokenize and
assemble RequestOutputs (OutputProcessor), and hand each one to the request's asyncio queue. The core process
is spawned, so a script that builds an AsyncLLM needs the `if __name__ == "__main__":` guard.
"""
import asyncio
import dataclasses
import logging
import os
from collections import deque
from collections.abc import AsyncIterator, Callable

from pagedllm.config import EngineConfig
from pagedllm.core.messages import EngineCoreOutput
from pagedllm.engine.core_process import CoreClient
from pagedllm.engine.engine import is_large_gpu, resolve_model
from pagedllm.engine.input_processor import InputProcessor
from pagedllm.engine.output_processor import OutputKind, OutputProcessor
from pagedllm.engine.tokenizer import load_eos_token_ids, load_tokenizer
from pagedllm.metrics import SchedulerStats, StepStats
from pagedllm.outputs import RequestOutput
from pagedllm.request import RequestStatus
from pagedllm.sampling_params import SamplingParams

logger = logging.getLogger("pagedllm")


class QueueFullError(Exception):
    """The waiting queue is at its bound (max_waiting_queue_length): retry later."""


class EngineDeadError(RuntimeError):
    """The engine core process has exited; no request can run any more."""


class EngineGenerateError(RuntimeError):
    """The engine core failed this request (its data raised there, or its step did); others run on."""


class AsyncLLM:
    def __init__(self, config: EngineConfig, max_waiting_queue_length: int | None = None,
                 on_step_stats: Callable[[StepStats], None] | None = None):
        """max_waiting_queue_length: refuse new requests (QueueFullError) while this many sequences wait
        for their first step (None = no bound). on_step_stats: called with each step's request timings."""
        model = resolve_model(config)   # the config's errors, before a process starts
        self.config = config = config.with_batch_defaults(is_large_gpu(model.device), serving=True)
        self.core = CoreClient(config)
        self.max_model_len = model.max_model_len
        self.tokenizer = load_tokenizer(config.tokenizer or config.model)   # while the core loads the model
        self.input_processor = InputProcessor(
            self.tokenizer, load_eos_token_ids(config.model, self.tokenizer), model.hf_config.vocab_size,
            self.max_model_len, config.block_size, self.core.wait_ready(), config.enable_prefix_caching)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.max_waiting_queue_length = max_waiting_queue_length
        self.on_step_stats = on_step_stats
        self.dead = False
        self._queues: dict[str, asyncio.Queue] = {}
        self._unscheduled: set[str] = set()           # sequences not yet in any step: the waiting queue
        self._stats_waiters: deque[asyncio.Future] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- requests ----------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], sampling_params: SamplingParams,
                    output_kind: OutputKind = OutputKind.CUMULATIVE) -> AsyncIterator[RequestOutput]:
        """Validates and queues the request now: raises ValueError for an invalid request, QueueFullError at
        the waiting-queue bound. Returns the iterator of its outputs; leaving it early (break, cancel, a
        closed client) aborts the request, which frees its KV blocks. A caller that never iterates it
        must abort() the request itself."""
        q = self._add_request(request_id, prompt, sampling_params, output_kind)
        return self._outputs(request_id, q, output_kind)

    async def generate(self, prompt: str | list[int], sampling_params: SamplingParams, request_id: str,
                       output_kind: OutputKind = OutputKind.CUMULATIVE) -> AsyncIterator[RequestOutput]:
        """Yields the request's outputs as tokens arrive, until the finished one (see add_request)."""
        async for out in self.add_request(request_id, prompt, sampling_params, output_kind):
            yield out

    async def _outputs(self, request_id: str, q: asyncio.Queue, kind: OutputKind) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                out = await q.get()
                while not q.empty() and not isinstance(out, BaseException):
                    # A consumer that fell behind gets one output for several steps: less work per token
                    # just when the API process is the bottleneck.
                    out = _merge(out, q.get_nowait(), kind)
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request_id)

    def _add_request(self, request_id: str, prompt, params: SamplingParams, kind: OutputKind) -> asyncio.Queue:
        self._attach()
        if self.dead:
            raise EngineDeadError("the engine core process has exited")
        if request_id in self.output_processor.parents:
            raise ValueError(f"request_id {request_id!r} is already in use")
        bound = self.max_waiting_queue_length
        if bound is not None and len(self._unscheduled) >= bound:
            raise QueueFullError(f"{len(self._unscheduled)} sequences are waiting: the bound is "
                                 f"max_waiting_queue_length ({bound})")
        req = self.input_processor.process(request_id, prompt, params)
        self.output_processor.add_request(request_id, req.prompt, req.prompt_token_ids, req.params, kind,
                                          req.arrival_time)
        q = self._queues[request_id] = asyncio.Queue()
        self._unscheduled.update(r.request_id for r in req.core_requests)
        self.core.send(("add", req.core_requests))
        return q

    def abort(self, request_id: str):
        """Ends the request; the core frees its blocks before its next step."""
        child_ids = self.output_processor.child_ids(request_id)
        self._queues.pop(request_id, None)
        if not child_ids:
            return   # finished already
        self.output_processor.abort(request_id)
        self._unscheduled.difference_update(child_ids)
        self.core.send(("finish", child_ids, RequestStatus.FINISHED_ABORTED))

    async def get_stats(self) -> SchedulerStats:
        """The core's counts, taken after every message sent before this call (aborts included)."""
        self._attach()
        if self.dead:
            raise EngineDeadError("the engine core process has exited")
        fut = self._loop.create_future()
        self._stats_waiters.append(fut)
        self.core.send(("stats",))
        return await fut

    def shutdown(self):
        if self._loop is not None and not self.dead:
            self._loop.remove_reader(self.core.conn.fileno())
        self.core.shutdown()

    # ---- outputs from the core ----------------------------------------------------------------------------
    def _attach(self):
        """Read the core's pipe from this event loop (bound on first use: the loop may not exist at init)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self.core.conn.fileno(), self._on_readable)
            # The loop (libuv) switched the pipe to non-blocking mode, and the pipe is duplex: the writer
            # thread's send would then fail with EAGAIN whenever the pipe is full (a burst of long prompts),
            # and recv could fail inside a message. Blocking again; the loop only polls the fd for reading.
            os.set_blocking(self.core.conn.fileno(), True)

    def _on_readable(self):
        try:
            while self.core.conn.poll():
                msg = self.core.conn.recv()
                if msg[0] == "outputs":
                    self._process_outputs([EngineCoreOutput(*row) for row in msg[1]], msg[2])
                elif msg[0] == "stats":
                    fut = self._stats_waiters.popleft()
                    if not fut.done():
                        fut.set_result(msg[1])
        except (EOFError, OSError):
            self._on_core_exit()

    def _process_outputs(self, core_outputs, stats: StepStats):
        self._unscheduled.difference_update(stats.first_scheduled_ids)
        outputs, stopped, errors = self.output_processor.process(core_outputs, stats)
        if stopped:   # a stop string ended them: the core must free them
            self.core.send(("finish", stopped, RequestStatus.FINISHED_STOPPED))
        for out in outputs:
            q = self._queues.pop(out.request_id, None) if out.finished else self._queues.get(out.request_id)
            if q is not None:
                error = errors.get(out.request_id)
                q.put_nowait(out if error is None else EngineGenerateError(
                    f"the engine failed request {out.request_id}: {error}"))
        if errors:   # `stopped` has every sequence of a failed request: some failed before any step
            self._unscheduled.difference_update(stopped)
        if self.on_step_stats is not None:
            self.on_step_stats(stats)

    def _on_core_exit(self):
        logger.error("the engine core process exited (code %s)", self.core.process.exitcode)
        self.dead = True
        self._loop.remove_reader(self.core.conn.fileno())
        error = EngineDeadError("the engine core process has exited")
        for q in self._queues.values():
            q.put_nowait(error)
        self._queues.clear()
        while self._stats_waiters:
            fut = self._stats_waiters.popleft()
            if not fut.done():
                fut.set_exception(error)


def _merge(a: RequestOutput, b, kind: OutputKind):
    """b came after a. DELTA outputs concatenate per sequence; the others are snapshots: b wins."""
    if isinstance(b, BaseException) or kind != OutputKind.DELTA:
        return b
    merged = {c.index: c for c in a.outputs}
    for c in b.outputs:
        prev = merged.get(c.index)
        if prev is None:
            merged[c.index] = c
            continue
        logprobs = None if prev.logprobs is None else prev.logprobs + (c.logprobs or [])
        merged[c.index] = dataclasses.replace(c, text=prev.text + c.text, token_ids=prev.token_ids + c.token_ids,
                                              logprobs=logprobs)
    return dataclasses.replace(b, outputs=sorted(merged.values(), key=lambda c: c.index))
