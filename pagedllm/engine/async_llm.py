"""AsyncLLM: the online engine. Requests come and go at any time; outputs stream as tokens arrive.

The engine core (scheduler + model runner) runs in its own process (see core_process.py); this object lives
in the API process's event loop and does the rest: tokenize and validate (InputProcessor), detokenize and
assemble RequestOutputs (OutputProcessor), and hand each one to the request's asyncio queue. The core process
is spawned, so a script that builds an AsyncLLM needs the `if __name__ == "__main__":` guard.
"""
import asyncio
import dataclasses
import functools
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable

from pagedllm.config import EngineConfig
from pagedllm.core.messages import EngineCoreOutput
from pagedllm.engine.core_process import HEARTBEAT_INTERVAL, CoreClient
from pagedllm.engine.engine import reset_answer, resolve_model
from pagedllm.engine.engine_args import AsyncEngineArgs
from pagedllm.engine.generation_config import load_default_sampling_params
from pagedllm.engine.input_processor import InputProcessor, check_request_types
from pagedllm.engine.output_processor import OutputKind, OutputProcessor, child_request_id
from pagedllm.engine.tokenization_kwargs import apply_tokenization_kwargs, check_tokenization_kwargs
from pagedllm.engine.tokenizer import load_engine_tokenizer
from pagedllm.engine.vllm_config import ModelConfig, VllmConfig, vllm_config_of
from pagedllm.metrics import SchedulerStats, StatsLogger, StepStats
from pagedllm.outputs import RequestOutput
from pagedllm.request import RequestStatus
from pagedllm.sampling_params import RequestOutputKind, SamplingParams
from pagedllm.vllm_names import ASYNC_LLM_NAMES, not_built, refusing

logger = logging.getLogger("pagedllm")
_OUTPUT_KINDS = {RequestOutputKind.CUMULATIVE: OutputKind.CUMULATIVE, RequestOutputKind.DELTA: OutputKind.DELTA,
                 RequestOutputKind.FINAL_ONLY: OutputKind.FINAL}


class QueueFullError(Exception):
    """The waiting queue is at its bound (max_waiting_queue_length): retry later."""


class EngineDeadError(RuntimeError):
    """The engine core process has exited; no request can run any more."""


class EngineGenerateError(RuntimeError):
    """The engine core failed this request (its data raised there, or its step did); others run on.
    status 400: the request's own fault (a structured-output constraint that did not compile in time)."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status


class AsyncLLM:
    def __init__(self, config: EngineConfig, max_waiting_queue_length: int | None = None,
                 on_step_stats: Callable[[StepStats], None] | None = None, heartbeat_timeout: float = 5.0,
                 step_timeout: float = 60.0, on_dead: Callable[[], None] | None = None, stream_interval: int = 1,
                 core: CoreClient | None = None, shared_waiting=None, log_requests: bool = False):
        """max_waiting_queue_length: refuse new requests (QueueFullError) while this many sequences wait
        for their first step (None = no bound). on_step_stats: called with each step's request timings.
        heartbeat_timeout: seconds without a message from the core (its heartbeat thread sends one every
        HEARTBEAT_INTERVAL) after which it counts as stopped; step_timeout: seconds one pass of its step loop
        may take (a long prefill, a kernel compiling) before it counts as hung. Either way: not healthy,
        requests in flight fail.
        on_dead: called once when the core process has exited (the server exits then).
        stream_interval: a streamed (DELTA or CUMULATIVE) request's outputs come every this many tokens (the
        first token and the finish at once); 1: one output per step.
        core: a client of a core process started already (by server/launch.py before the server's imports, or
        one of several API processes' in server/api_servers.py; default: start one); it is shut down with this
        engine, or if this constructor fails. shared_waiting: with several, the multiprocessing.Value of
        sequences waiting in all of them, which max_waiting_queue_length bounds. log_requests (vLLM's
        enable_log_requests): an info line for each request added and aborted (the server logs its own)."""
        self.core = core
        try:
            model = resolve_model(config)   # the config's errors, before a process starts (no CUDA context here)
            self.core = CoreClient(config) if core is None else core
            self.max_model_len = model.max_model_len
            self.tokenizer = load_engine_tokenizer(config)   # while the core loads the model
            # The core's config: the batch defaults it chose for its GPU (serving_config).
            num_blocks, self.config = self.core.wait_ready()
        except BaseException:
            if self.core is not None:
                self.core.shutdown()
            raise
        config = self.config
        self.input_processor = InputProcessor.for_engine(config, self.tokenizer, model.hf_config.vocab_size,
                                                         self.max_model_len, num_blocks)
        self.output_processor = OutputProcessor(self.tokenizer, stream_interval)
        self.default_sampling_params = load_default_sampling_params(config.model, config.generation_config,
                                                            config.override_generation_config)
        # vLLM's AsyncLLM.vllm_config / .model_config: views of the core's config and its KV cache's size
        self.vllm_config: VllmConfig = vllm_config_of(config, model, num_blocks, self.default_sampling_params)
        self.max_waiting_queue_length = max_waiting_queue_length
        self.log_requests = log_requests
        self._stats_logger = StatsLogger(0)           # do_log_stats()' lines (their rates since the last)
        self.shared_waiting = shared_waiting
        self._num_published = 0                       # this process's part of shared_waiting
        self.on_step_stats = on_step_stats
        self.heartbeat_timeout = heartbeat_timeout
        self.step_timeout = step_timeout
        self.on_dead = on_dead
        self.dead = False
        self.closing = False                          # shutting down: the core's exit is expected
        self.last_heartbeat = time.monotonic()        # of the last message from the core
        self.core_stall = 0.0                         # its step loop's time in one pass, as of that message
        self._queues: dict[str, OutputQueue] = {}
        self._unscheduled: set[str] = set()           # sequences not yet in any step: the waiting queue
        self._stats_waiters: deque[asyncio.Future] = deque()
        self._aliases: dict[str, list[str]] = {}      # generate()'s request_id in use -> its other requests' ids
        self._lora_calls: dict[int, asyncio.Future] = {}   # add/remove/list_loras calls by id, until answered
        self._call_ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchdog: asyncio.Task | None = None
        self._num_stale_stats = 0                     # replies still due to failed get_stats() calls
        self._steps: deque[tuple] = deque()           # ("outputs", rows, StepStats) read, not yet processed
        self._step_scheduled = False                  # _process_next_step is due on the event loop

    @classmethod
    def from_engine_args(cls, engine_args: AsyncEngineArgs, start_engine_loop: bool = True, usage_context=None,
                         stat_loggers: list | None = None) -> "AsyncLLM":
        """vLLM's way to build one: AsyncLLM.from_engine_args(AsyncEngineArgs(model=..., ...)). As under vLLM,
        start_engine_loop changes nothing (the outputs are read from the first request on); usage_context names
        vLLM's usage report, which is not built here. stat_loggers (vLLM's plug-in loggers) are not built."""
        _check_no_stat_loggers("from_engine_args", stat_loggers)
        return cls(engine_args.create_engine_config(), **engine_args.async_llm_kwargs())

    @classmethod
    def from_vllm_config(cls, vllm_config: EngineConfig, start_engine_loop: bool = True, usage_context=None,
                         stat_loggers: list | None = None, enable_log_requests: bool = False,
                         aggregate_engine_logging: bool = False, disable_log_stats: bool = False,
                         client_addresses: dict | None = None, client_count: int = 1,
                         client_index: int = 0) -> "AsyncLLM":
        """vLLM's other way: AsyncLLM.from_vllm_config(engine_args.create_engine_config()), whose config here is
        the EngineConfig that AsyncEngineArgs.create_engine_config() returns. aggregate_engine_logging (several
        data-parallel engines' lines in one) has one engine to log; the client_* arguments (several API
        processes of one core) are the server's (`pagedllm serve --api-server-count`), not taken here."""
        if not isinstance(vllm_config, EngineConfig):
            raise TypeError(f"AsyncLLM.from_vllm_config() takes the EngineConfig that "
                            f"AsyncEngineArgs.create_engine_config() returns, got {type(vllm_config).__name__} "
                            f"(an engine's .vllm_config is a read-only view of vLLM's names, not a config to build on)")
        _check_no_stat_loggers("from_vllm_config", stat_loggers)
        if client_addresses is not None or client_count != 1 or client_index != 0:
            raise NotImplementedError("AsyncLLM.from_vllm_config(client_addresses=..., client_count=..., "
                                      "client_index=...): API processes sharing one engine core are the server's "
                                      "(pagedllm serve --api-server-count)")
        if disable_log_stats:
            vllm_config = dataclasses.replace(vllm_config, log_stats_interval=0.0)
        return cls(vllm_config, log_requests=enable_log_requests)

    @property
    def model_config(self) -> ModelConfig:
        """vLLM's AsyncLLM.model_config: the model, dtype, max_model_len, hf_config... the core runs with."""
        return self.vllm_config.model_config

    def get_tokenizer(self):
        """vLLM's: the engine's tokenizer; with skip_tokenizer_init there is none, a ValueError as vLLM's."""
        if self.tokenizer is None:
            raise ValueError("no tokenizer: the engine was built with skip_tokenizer_init=True (prompts are token "
                             "ids, outputs carry token ids only)")
        return self.tokenizer

    async def get_supported_tasks(self) -> tuple[str, ...]:
        """vLLM's: the tasks the model serves. Generative models only are built (no pooling tasks)."""
        return ("generate",)

    def encode(self, prompt, pooling_params, request_id: str, *args, **kwargs):
        """vLLM's pooling entry point: a generative model has no pooling task, a ValueError as under vLLM."""
        raise ValueError("AsyncLLM.encode() needs a pooling model (embedding, classification, scoring, reward), "
                         "which pagedllm does not build: it runs generative models only (generate)")

    async def is_sleeping(self) -> bool:   # vLLM's sleep mode is not built: never asleep
        return False

    async def is_paused(self) -> bool:     # pausing the scheduler is not built: never paused
        return False

    async def is_tracing_enabled(self) -> bool:   # no OpenTelemetry tracing is built
        return False

    async def reset_mm_cache(self) -> None:
        """vLLM's: clears the multimodal caches. Multimodal inputs are not built: there is none to clear."""

    async def reset_encoder_cache(self) -> None:
        """vLLM's: clears the encoder cache of multimodal models; none is built, nothing to clear."""

    async def do_log_stats(self) -> None:
        """vLLM's: a statistics log line now (the core also logs one every log_stats_interval seconds)."""
        self._stats_logger.log(await self.get_stats())

    # ---- requests ----------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int] | dict, sampling_params: SamplingParams,
                    output_kind: OutputKind | None = None,
                    cache_salt: str | None = None, lora_request=None, kv_parent: str | None = None,
                    hold_kv: bool = False, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Validates and queues the request now: raises ValueError for an invalid request, QueueFullError at
        the waiting-queue bound. lora_request: its adapter, loaded in the core process if new (a bad one
        fails the request there: finish_reason "error"). Returns the iterator of its outputs; leaving it early
        (break, cancel, a closed client) aborts the request, which frees its KV blocks. A caller that never iterates it
        must abort() the request itself. kv_parent, hold_kv, priority: as Engine.add_request's. output_kind:
        None takes sampling_params.output_kind (vLLM's way to ask for deltas)."""
        q = self._add_request(request_id, prompt, sampling_params, output_kind, cache_salt, lora_request,
                              kv_parent, hold_kv, priority)
        return self._outputs(request_id, q)

    async def generate(self, prompt: str | list[int] | dict, sampling_params: SamplingParams, request_id: str,
                       output_kind: OutputKind | None = None,
                       lora_request=None, priority: int = 0, *, tokenization_kwargs: dict | None = None,
                       prompt_text: str | None = None, trace_headers=None, data_parallel_rank: int | None = None,
                       reasoning_ended: bool | None = None,
                       reasoning_parser_kwargs: dict | None = None) -> AsyncIterator[RequestOutput]:
        """Yields the request's outputs as tokens arrive, until the finished one (see add_request).
        vLLM's keywords: tokenization_kwargs as LLM.generate's (tokenization_kwargs.py). prompt_text and
        trace_headers change nothing, as under vLLM for these prompts (it takes prompt_text for a prebuilt
        EngineCoreRequest only) and with no tracing endpoint (none is built here). data_parallel_rank: 0 or
        None, the one rank. reasoning_ended / reasoning_parser_kwargs: the engine keeps no reasoning state.
        A request_id in use (a running generate()'s) is taken, as vLLM 0.26 takes it: the request runs under an
        alias, its outputs say request_id, and abort(request_id) ends every request of that id. add_request,
        this project's lower-level call (beam search and kv_parent name requests by id), refuses one instead."""
        if isinstance(prompt, AsyncIterator):   # vLLM 0.26's streaming input: StreamingInput items, each a chunk
            raise NotImplementedError("generate() with an async generator of prompt chunks (vLLM's streaming "
                                      "input) is not built: pass the whole prompt (text, token ids or a dict)")
        _check_vllm_keywords(data_parallel_rank, reasoning_ended, reasoning_parser_kwargs)
        check_tokenization_kwargs(tokenization_kwargs)
        if tokenization_kwargs:
            check_request_types(request_id, prompt, sampling_params)
            (prompt,), (sampling_params,) = apply_tokenization_kwargs(tokenization_kwargs, [prompt],
                                                                      [sampling_params], self.tokenizer)
        internal = self._free_id(request_id, sampling_params)
        outputs = None
        try:
            outputs = self.add_request(internal, prompt, sampling_params, output_kind, lora_request=lora_request,
                                       priority=priority)
            async for out in outputs:
                out.request_id = request_id   # the caller's, also under an alias
                yield out
        finally:   # this stream closed early (aclose): the request ends now, not when `outputs` is collected
            if outputs is not None:
                await outputs.aclose()
            if internal != request_id:
                self._forget_alias(request_id, internal)

    async def _outputs(self, request_id: str, q: "OutputQueue") -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                # One output per step, never merged: a stream's chunk carries one step's tokens
                # (--stream-interval N buffers N tokens in the output processor instead).
                out = await q.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
        finally:
            if not finished:
                self._abort_one(request_id)

    def _add_request(self, request_id: str, prompt, params: SamplingParams, kind: OutputKind | None,
                     cache_salt: str | None = None, lora_request=None, kv_parent: str | None = None,
                     hold_kv: bool = False, priority: int = 0) -> "OutputQueue":
        check_request_types(request_id, prompt, params)
        kind = _OUTPUT_KINDS[params.output_kind] if kind is None else kind
        self.attach()
        self._check_alive()
        if self._in_use(request_id, params.num_sequences):
            raise ValueError(f"request_id {request_id!r} is already in use")
        self._check_queue_bound(params.num_sequences, "n" if params.best_of is None else "best_of")
        try:
            req = self.input_processor.process(request_id, prompt, params, cache_salt=cache_salt,
                                               lora_request=lora_request, kv_parent=kv_parent, hold_kv=hold_kv,
                                               priority=priority)
            # Sent (pickled) before anything is registered: one that cannot be pickled fails alone, here. Its
            # outputs cannot overtake the registration: the pipe's reader runs on this loop, after this returns.
            self.core.send(("add", req.core_requests))
            self.output_processor.add_request(request_id, req.prompt, req.prompt_token_ids, req.params, kind,
                                              req.arrival_time, lora_request)
            q = self._queues[request_id] = OutputQueue()
            self._unscheduled.update(r.request_id for r in req.core_requests)
            if self.log_requests:
                logger.info("Added request %s.", request_id)
        finally:
            self._publish_waiting()   # a refused request's place, taken by the bound's check, is given back
        return q

    def _in_use(self, request_id: str, n: int) -> bool:
        """n > 1 runs as sequences "<id>#<i>": none of them may be a running request's sequence either."""
        return request_id in self.output_processor.parents or any(
            child_request_id(request_id, i, n) in self.output_processor.child_to_parent for i in range(n))

    def _free_id(self, request_id, params) -> str:
        """generate()'s id for a request: its request_id, or, while that is in use, "<request_id>-<k>" (vLLM's
        generate takes a request_id in use, as it makes every id unique), kept as one of request_id's aliases."""
        if not isinstance(request_id, str) or not isinstance(params, SamplingParams):
            return request_id   # add_request's TypeError names it
        internal = request_id
        while self._in_use(internal, params.num_sequences):
            internal = f"{request_id}-{next(self._call_ids)}"
        if internal != request_id:
            self._aliases.setdefault(request_id, []).append(internal)
        return internal

    def _forget_alias(self, request_id: str, internal: str):
        aliases = self._aliases.get(request_id)
        if aliases is not None and internal in aliases:
            aliases.remove(internal)
            if not aliases:
                del self._aliases[request_id]

    def _check_queue_bound(self, n: int, name: str = "n"):
        """The bound counts sequences: a request's n all wait. One with more than the bound could never be
        admitted however long it waited, so it is a 400 naming n, not a 503 to retry."""
        bound = self.max_waiting_queue_length
        if bound is None:
            return
        if n > bound:
            raise ValueError(f"SamplingParams.{name} must be at most max_waiting_queue_length ({bound}) on this "
                             f"server, got {n}")
        if self.shared_waiting is None:
            waiting = len(self._unscheduled)
        else:   # taken here under the lock, so that two API processes cannot both take the last places
            with self.shared_waiting.get_lock():
                waiting = self.shared_waiting.value
                if waiting + n <= bound:
                    self.shared_waiting.value += n
                    self._num_published += n
        if waiting + n > bound:
            raise QueueFullError(f"{waiting} sequences are waiting and this request adds {n}: "
                                 f"the bound is max_waiting_queue_length ({bound})")

    def _publish_waiting(self):
        """shared_waiting follows this process's count of waiting sequences."""
        if self.shared_waiting is None:
            return
        delta = len(self._unscheduled) - self._num_published
        if delta:
            with self.shared_waiting.get_lock():
                self.shared_waiting.value += delta
            self._num_published += delta

    def _check_alive(self):
        reason = self.unhealthy_reason()
        if reason is not None:
            raise EngineDeadError(reason)

    def unhealthy_reason(self) -> str | None:
        """None while the core is healthy (what /health reports); otherwise why not: its process exited, it
        sent nothing for heartbeat_timeout (stopped), or one pass of its loop has run past step_timeout (hung).
        Messages already in the pipe count: a busy (or not yet attached) event loop may not have read them."""
        reason = self._judge()
        if reason is not None and not self.dead and self._loop is not None:
            self._on_readable()
            reason = self._judge()
        return reason

    def _judge(self) -> str | None:
        if self.dead:
            return "the engine was shut down" if self.closing else "the engine core process has exited"
        if self._loop is None:   # nothing reads the pipe yet: its heartbeats wait there, only an exit tells
            return None if self.core.process.is_alive() else "the engine core process has exited"
        if time.monotonic() - self.last_heartbeat > self.heartbeat_timeout:
            return f"the engine core has not responded for {self.heartbeat_timeout:g} s"
        if self.core_stall > self.step_timeout:
            return f"the engine core's step has run for more than {self.step_timeout:g} s"
        return None

    # ---- health, as vLLM's EngineClient reports it ----------------------------------------------------------
    @property
    def is_running(self) -> bool:
        """vLLM's: False once the core process has exited or the engine was shut down."""
        return not self.dead

    @property
    def errored(self) -> bool:
        """vLLM's: True when no request can run: the core exited, or is stopped or hung (unhealthy_reason)."""
        return self.unhealthy_reason() is not None

    @property
    def is_stopped(self) -> bool:   # vLLM's: the same as errored
        return self.errored

    @property
    def dead_error(self) -> BaseException:
        """vLLM's: the error that requests now fail with."""
        return EngineDeadError(self.unhealthy_reason() or "the engine core is not dead")

    async def check_health(self) -> None:
        """vLLM's: raises dead_error (EngineDeadError, saying why) when the engine cannot run requests."""
        self.attach()   # the core's heartbeats are read from now on
        self._check_alive()

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop

    def fail_in_flight(self, reason: str):
        """Every request in flight ends with EngineDeadError(reason) and is aborted (a server stopping)."""
        if self._queues:
            logger.info("%s: ending %d requests in flight", reason, len(self._queues))
        self._fail_all(EngineDeadError(reason), abort=True)

    def release_kv_holds(self, request_ids: list[str]):
        """As Engine.release_kv_holds; applied in the core after the messages sent before it."""
        if request_ids:
            self.core.send(("release", list(request_ids)))

    def abort(self, request_id: str | Iterable[str], internal: bool = False) -> "Aborted":
        """Ends the request, or each of an iterable of them (vLLM's); the core frees their blocks before its next
        step. A stream ends with a finished output whose unfinished sequences say "abort" (vLLM's). It takes
        effect when called; what it returns may be awaited, as vLLM's coroutine is (`await engine.abort(...)`).
        An unknown or finished id changes nothing. internal (vLLM's: the id is its engine's own, suffixed one):
        ids here are the caller's, so both mean the same."""
        if not isinstance(request_id, str):
            for one in request_id:
                self.abort(one)
            return ABORTED
        for alias in self._aliases.pop(request_id, ()):   # generate()'s requests of this id run under these
            self._abort_one(alias)
        return self._abort_one(request_id)

    def _abort_one(self, request_id: str) -> "Aborted":
        child_ids = self.output_processor.child_ids(request_id)
        q = self._queues.pop(request_id, None)
        if not child_ids:
            return ABORTED   # finished already
        if q is not None:   # its stream may be read still (another caller aborts it): it ends, not waits forever
            q.put_nowait(self.output_processor.aborted_output(request_id))
        self.output_processor.abort(request_id)
        self._unscheduled.difference_update(child_ids)
        self._publish_waiting()
        self.core.send(("finish", child_ids, RequestStatus.FINISHED_ABORTED))
        if self.log_requests:
            logger.info("Aborted request %s.", request_id)
        return ABORTED

    async def get_stats(self) -> SchedulerStats:
        """The core's counts, taken after every message sent before this call (aborts included)."""
        self.attach()
        self._check_alive()
        fut = self._loop.create_future()
        self._stats_waiters.append(fut)
        self.core.send(("stats",))
        return await fut

    # ---- LoRA adapters: loaded and held in the core process (vLLM's names) ----------------------------------
    async def add_lora(self, lora_request) -> bool:
        """Loads the adapter in the core (a loader thread reads it; other requests' steps go on) and returns
        once it is on the host; a bad one raises its ValueError here."""
        return await self._core_call("add_lora", lora_request)

    async def remove_lora(self, lora_id: int) -> bool:
        """False for an unknown adapter or one that unfinished requests use (they finish under it). lora_id: its
        lora_int_id (vLLM's argument name)."""
        return await self._core_call("remove_lora", lora_id)

    async def list_loras(self) -> set[int]:
        return await self._core_call("list_loras")

    async def pin_lora(self, lora_id: int) -> bool:
        """vLLM's: the loaded adapter is never evicted from the core's host LRU (Engine.pin_lora)."""
        return await self._core_call("pin_lora", lora_id)

    async def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        """vLLM's: forget every cached prefix (the GPU, CPU and disk tiers; the latter two are this project's
        counterpart of vLLM's connector, always reset). False while requests hold KV blocks: preempting them first
        (reset_running_requests) is not built, a NotImplementedError. Applied after every message sent before it
        (an abort's blocks are free by then)."""
        return reset_answer(await self._core_call("reset_prefix_cache"), reset_running_requests)

    async def _core_call(self, name: str, *args):
        """Answered by call id: an add_lora whose adapter is read on a loader thread answers after later calls."""
        self.attach()
        self._check_alive()
        call_id = next(self._call_ids)
        fut = self._lora_calls[call_id] = self._loop.create_future()
        self.core.send(("lora", call_id, name, *args))
        try:
            return await fut
        finally:
            self._lora_calls.pop(call_id, None)

    def shutdown(self, timeout: float | None = None):
        """Stops the core. Streams still read end with EngineDeadError, and later calls raise it (not an OSError
        of the closed pipe). timeout (vLLM's): seconds to wait for the core process's exit before it is killed
        (None: 5)."""
        self.closing = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._loop is not None and not self.dead:
            self._loop.remove_reader(self.core.conn.fileno())
        self.core.shutdown(timeout)
        was_dead, self.dead = self.dead, True
        if not was_dead and self._loop is not None and not self._loop.is_closed():
            self._fail_all(EngineDeadError("the engine was shut down"), abort=False)

    # ---- outputs from the core ----------------------------------------------------------------------------
    def attach(self):
        """Read the core's pipe from this event loop, and watch the core (bound on first use, or by the server
        at start-up: the loop may not exist at init)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self.core.conn.fileno(), self._on_readable)
            self._watchdog = self._loop.create_task(self._watch())
            # The loop (libuv) switched the pipe to non-blocking mode, and the pipe is duplex: the writer
            # thread's send would then fail with EAGAIN whenever the pipe is full (a burst of long prompts),
            # and recv could fail inside a message. Blocking again; the loop only polls the fd for reading.
            os.set_blocking(self.core.conn.fileno(), True)

    def _on_readable(self):
        try:
            while self.core.conn.poll():
                msg = self.core.conn.recv()
                self.last_heartbeat = time.monotonic()   # any message: outputs, stats or a heartbeat
                if msg[0] == "heartbeat":
                    self.core_stall = msg[1]
                elif msg[0] == "outputs":
                    self.core_stall = 0.0
                    self._steps.append(msg)
                elif msg[0] == "lora_reply":
                    self._answer_lora_call(*msg[1:])
                elif msg[0] == "stats":   # replies come in the order of the calls
                    if self._num_stale_stats:   # the reply to a call failed while the core was silent
                        self._num_stale_stats -= 1
                        continue
                    fut = self._stats_waiters.popleft()
                    if fut.done():
                        continue
                    fut.set_result(msg[1])
        except (EOFError, OSError):
            self._on_core_exit()
            return
        if self._steps and not self._step_scheduled:
            self._process_next_step()

    def _answer_lora_call(self, call_id: int, result):
        fut = self._lora_calls.get(call_id)
        if fut is None or fut.done():
            return   # failed meanwhile (the core was silent) or its caller left
        fut.set_exception(result) if isinstance(result, BaseException) else fut.set_result(result)

    def _process_next_step(self):
        """One step's outputs, then the event loop's turn: the streams write that step's chunks before the
        next step is processed. The pipe itself is read empty at once (_on_readable), so a core that runs
        ahead of this process never blocks on a full pipe; a lagging API process sends every step's chunk
        late by the same amount instead of several steps' chunks in one burst."""
        self._step_scheduled = False
        if not self._steps:
            return
        msg = self._steps.popleft()
        try:
            self._process_outputs([EngineCoreOutput(*row) for row in msg[1]], msg[2])
        finally:
            if self._steps:
                self._step_scheduled = True
                self._loop.call_soon(self._process_next_step)

    def _process_outputs(self, core_outputs, stats: StepStats):
        self._unscheduled.difference_update(stats.first_scheduled_ids)
        outputs, stopped, errors = self.output_processor.process(core_outputs, stats)
        if stopped:   # a stop string ended them, or a sibling failed: the core must free them
            self.core.send(("finish", stopped, RequestStatus.FINISHED_STOPPED))
        for out in outputs:
            q = self._queues.pop(out.request_id, None) if out.finished else self._queues.get(out.request_id)
            if q is not None:
                error = errors.get(out.request_id)
                q.put_nowait(out if error is None else EngineGenerateError(
                    f"the engine failed request {out.request_id}: {error.error}", 400 if error.bad_request else 500))
        if errors:   # `stopped` has every sequence of a failed request: some failed before any step
            self._unscheduled.difference_update(stopped)
        self._publish_waiting()
        if self.on_step_stats is not None:
            self.on_step_stats(stats)

    async def _watch(self):
        """Once a second: a core process that exited without closing the pipe is dead; one silent for
        heartbeat_timeout (stopped) or stuck in one pass of its loop for step_timeout (hung) fails the requests
        in flight, so no client waits for it forever.
        It may recover (SIGCONT): they were aborted, and new requests are taken again once it speaks."""
        while not self.dead:
            await asyncio.sleep(HEARTBEAT_INTERVAL)
            if not self.core.process.is_alive():
                self._on_readable()   # what it sent before it exited, then the EOF
                self._on_core_exit()
            elif ((self._queues or self._stats_waiters or self._lora_calls) and (reason := self.unhealthy_reason())
                  and not self.dead):
                logger.error("%s: failing %d requests in flight", reason, len(self._queues))
                self._fail_all(EngineDeadError(reason), abort=True)

    def _on_core_exit(self):
        if self.dead:
            return   # seen already (the pipe's EOF, or the watchdog)
        while self._steps:   # what it sent before it exited reaches the streams first
            self._process_next_step()
        self.core.process.join(timeout=1)   # the pipe closes as it dies: its exit code comes a moment later
        code = self.core.process.exitcode
        if self.closing:
            logger.info("the engine core process exited (code %s)", code)
        else:
            logger.error("the engine core process exited unexpectedly (code %s): failing %d requests in flight",
                         code, len(self._queues))
        self.dead = True
        self._loop.remove_reader(self.core.conn.fileno())
        self._fail_all(EngineDeadError("the engine core process has exited"), abort=False)
        if self.on_dead is not None and not self.closing:
            self.on_dead()

    def _fail_all(self, error: Exception, abort: bool):
        for request_id, q in list(self._queues.items()):
            q.put_nowait(error)
            if abort:
                self._abort_one(request_id)
        self._queues.clear()
        self._num_stale_stats += len(self._stats_waiters)
        while self._stats_waiters:
            fut = self._stats_waiters.popleft()
            if not fut.done():
                fut.set_exception(error)
        for fut in self._lora_calls.values():
            if not fut.done():
                fut.set_exception(error)


def _check_no_stat_loggers(method: str, stat_loggers):
    if stat_loggers:
        raise NotImplementedError(f"AsyncLLM.{method}(stat_loggers=...): vLLM's stat logger plug-ins are not built; "
                                  f"the engine core logs its statistics every log_stats_interval seconds, and "
                                  f"get_stats() returns them")


def _check_vllm_keywords(data_parallel_rank: int | None, reasoning_ended: bool | None,
                         reasoning_parser_kwargs: dict | None):
    """generate()'s vLLM keywords that ask for what is not built: refused, naming them (not ignored)."""
    if data_parallel_rank not in (None, 0):
        raise ValueError(f"data_parallel_rank {data_parallel_rank!r} is out of range: data parallelism is not "
                         f"built, the engine is the one rank 0")
    if reasoning_ended is not None or reasoning_parser_kwargs is not None:
        raise NotImplementedError("generate(reasoning_ended=..., reasoning_parser_kwargs=...): the engine keeps no "
                                  "reasoning-parser state; a structured-output constraint applies from the first "
                                  "generated token")


# vLLM's AsyncLLM methods not built here: a NotImplementedError saying why and what instead (vllm_names.py)
for _name in ASYNC_LLM_NAMES:
    setattr(AsyncLLM, _name, refusing(_name, functools.partial(not_built, "AsyncLLM")))


class Aborted:
    """What abort returns: done already, so awaiting it (vLLM's callers do) returns at once. Not a coroutine, so
    the callers that do not await it (a stream's finally, the server) still abort."""
    __slots__ = ()

    def __await__(self):
        return iter(())


ABORTED = Aborted()


class OutputQueue:
    """One request's outputs (or the error that ends it), in order, for its one consumer: asyncio.Queue's
    put_nowait and get without its bound and its many-consumer bookkeeping (this runs once a step a stream).
    An item put while the consumer waits is its future's result: get is one future, no coroutine of its own."""
    __slots__ = ("items", "waiter")

    def __init__(self):
        self.items: deque = deque()
        self.waiter: asyncio.Future | None = None

    def put_nowait(self, item):
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():   # done: its consumer was cancelled
                waiter.set_result(item)
                return
        self.items.append(item)

    def get(self) -> asyncio.Future:
        """The next item, awaited (a done future when one is queued: no suspension)."""
        waiter = asyncio.get_running_loop().create_future()
        if self.items:
            waiter.set_result(self.items.popleft())
        else:
            self.waiter = waiter
        return waiter
