"""AsyncLLM: the online engine. Requests come and go at any time; outputs stream as tokens arrive.

The engine core (scheduler + model runner) runs in its own process (see core_process.py); this object lives
in the API process's event loop and does the rest: tokenize and validate (InputProcessor), detokenize and
assemble RequestOutputs (OutputProcessor), and hand each one to the request's queue. Its link to the core (the
pipe's reader, the core's health, calls the core answers) is a CoreLink (core_link.py). The core process is
spawned, so a script that builds an AsyncLLM needs the `if __name__ == "__main__":` guard.
"""
import asyncio
import dataclasses
import functools
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Iterable

from pagedllm.config import EngineConfig
from pagedllm.core.messages import EngineCoreOutput
from pagedllm.engine.core_link import CoreLink, EngineDeadError
from pagedllm.engine.core_process import CoreClient
from pagedllm.engine.engine import reset_answer, resolve_model
from pagedllm.engine.engine_args import AsyncEngineArgs
from pagedllm.engine.generation_config import load_default_sampling_params
from pagedllm.engine.input_processor import InputProcessor, check_arrival_time, check_request_types
from pagedllm.engine.output_processor import OutputKind, OutputProcessor, child_request_id
from pagedllm.engine.output_queue import ABORTED, Aborted, OutputQueue, OutputStream
from pagedllm.engine.tokenization_kwargs import apply_tokenization_kwargs
from pagedllm.engine.tokenizer import load_engine_tokenizer
from pagedllm.engine.vllm_config import ModelConfig, VllmConfig, vllm_config_of
from pagedllm.metrics import SchedulerStats, StatsLogger, StepStats
from pagedllm.outputs import RequestOutput
from pagedllm.profiler import frontend_profiler
from pagedllm.request import RequestStatus
from pagedllm.sampling_params import SamplingParams
from pagedllm.engine.pause import check_mode, check_sleep_level, check_wake_up_tags
from pagedllm.vllm_names import ASYNC_LLM_NAMES, check_no_stat_loggers, check_vllm_keywords, not_built, refusing

logger = logging.getLogger("pagedllm")


class QueueFullError(Exception):
    """The waiting queue is at its bound (max_waiting_queue_length): retry later."""


class EngineGenerateError(RuntimeError):
    """The engine core failed this request (its data raised there, or its step did); others run on.
    status 400: the request's own fault (a structured-output constraint that did not compile in time)."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status


class AsyncLLM:
    def __init__(self, config: EngineConfig, max_waiting_queue_length: int | None = None,
                 on_step_stats: Callable[[StepStats], None] | None = None, heartbeat_timeout: float = 5.0,
                 step_timeout: float = 60.0, on_dead: Callable[[], None] | None = None,
                 core: CoreClient | None = None, shared_waiting=None, log_requests: bool = False):
        """max_waiting_queue_length: refuse new requests (QueueFullError) while this many sequences wait
        for their first step (None = no bound). on_step_stats: called with each step's request timings.
        heartbeat_timeout: seconds without a message from the core (its heartbeat thread sends one every
        HEARTBEAT_INTERVAL) after which it counts as stopped; step_timeout: seconds one pass of its step loop
        may take (a long prefill, a kernel compiling) before it counts as hung. Either way: not healthy,
        requests in flight fail.
        on_dead: called once when the core process has exited (the server exits then).
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
        self.output_processor = OutputProcessor(self.tokenizer, config.stream_interval)   # vLLM's: its config's
        self.default_sampling_params = load_default_sampling_params(config.model, config.generation_config,
                                                            config.override_generation_config)
        # vLLM's AsyncLLM.vllm_config / .model_config: views of the core's config and its KV cache's size
        self.vllm_config: VllmConfig = vllm_config_of(config, model, num_blocks, self.default_sampling_params)
        self.max_waiting_queue_length = max_waiting_queue_length
        self.log_requests = log_requests
        self._frontend_profiler = frontend_profiler(config.profiler_config)   # vLLM's trace of the API process
        self._stats_logger = StatsLogger(0)           # do_log_stats()' lines (their rates since the last)
        self.shared_waiting = shared_waiting
        self._num_published = 0                       # this process's part of shared_waiting
        self.on_step_stats = on_step_stats
        self._queues: dict[str, OutputQueue] = {}
        self._unscheduled: set[str] = set()           # sequences not yet in any step: the waiting queue
        self._aliases: dict[str, list[str]] = {}      # generate()'s request_id in use -> its other requests' ids
        self._alias_ids = itertools.count()
        self.link = CoreLink(self.core, heartbeat_timeout, step_timeout, on_dead, self._process_outputs,
                             self._fail_requests, lambda: len(self._queues))

    @classmethod
    def from_engine_args(cls, engine_args: AsyncEngineArgs, start_engine_loop: bool = True, usage_context=None,
                         stat_loggers: list | None = None) -> "AsyncLLM":
        """vLLM's way to build one: AsyncLLM.from_engine_args(AsyncEngineArgs(model=..., ...)). As under vLLM,
        start_engine_loop changes nothing (the outputs are read from the first request on); usage_context names
        vLLM's usage report, which is not built here. stat_loggers (vLLM's plug-in loggers) are not built."""
        check_no_stat_loggers("from_engine_args", stat_loggers)
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
        check_no_stat_loggers("from_vllm_config", stat_loggers)
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

    # ---- pausing the scheduler (vLLM's EngineClient names; engine/pause.py) -------------------------------
    async def pause_generation(self, *, mode: str = "abort", wait_for_inflight_requests: bool | None = None,
                               clear_cache: bool = True) -> None:
        """vLLM's: new requests queue, unscheduled, until resume_generation(); mode: abort the requests in the
        engine (their streams end with finish_reason "abort"), wait for the running ones to end (this returns
        then), or keep them frozen. wait_for_inflight_requests (vLLM's deprecated spelling): mode "wait".
        clear_cache: the prefix cache is emptied once idle (under "keep" only with no request holding blocks)."""
        if wait_for_inflight_requests:
            mode = "wait"
        await self.link.call("pause", check_mode(mode), bool(clear_cache))

    async def resume_generation(self) -> None:
        await self.link.call("resume")

    async def is_paused(self) -> bool:
        return await self.link.call("is_paused")

    async def sleep(self, level: int = 1, mode: str = "abort") -> None:
        """vLLM's; level 0 only: pause_generation(mode=mode) keeping the prefix cache. Levels 1 and 2 (the weights
        offloaded or discarded) are not built, refused naming the level."""
        level = check_sleep_level(level)
        await self.link.call("pause", check_mode(mode), False, level)

    async def wake_up(self, tags: list[str] | None = None) -> None:
        """vLLM's: resumes scheduling (tags: ["scheduling"], any of vLLM's, or None)."""
        check_wake_up_tags(tags)
        await self.link.call("resume")

    async def is_sleeping(self) -> bool:
        return await self.link.call("is_paused")

    # ---- vLLM's profiler (--profiler-config; profiler.py) ---------------------------------------------------
    async def start_profile(self, profile_prefix: str | None = None) -> None:
        """vLLM's: the torch profiler starts in the engine core (each tensor-parallel rank's) and, unless
        ignore_frontend, in this process (its CPU work); a RuntimeError naming --profiler-config without one."""
        await self.link.call("profile", True, profile_prefix)
        if self._frontend_profiler is not None:
            await asyncio.to_thread(self._frontend_profiler.start)

    async def stop_profile(self) -> None:
        """The profilers stop, each writing its trace into torch_profiler_dir."""
        await self.link.call("profile", False)
        if self._frontend_profiler is not None:
            await asyncio.to_thread(self._frontend_profiler.stop)

    async def is_tracing_enabled(self) -> bool:   # no OpenTelemetry tracing is built
        return False

    async def reset_mm_cache(self) -> None:
        """vLLM's: clears the multimodal caches. Multimodal inputs are not built: there is none to clear."""

    async def reset_encoder_cache(self) -> None:
        """vLLM's: clears the encoder cache of multimodal models; none is built, nothing to clear."""

    async def do_log_stats(self) -> None:
        """vLLM's: a statistics log line now (the core also logs one every log_stats_interval seconds)."""
        self._stats_logger.log(await self.get_stats())

    def attach(self):
        """Read the core's pipe from this event loop (on first use, or by the server at start-up)."""
        self.link.attach()

    # ---- requests ----------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int] | dict, params: SamplingParams,
                    arrival_time: float | None = None, lora_request=None, tokenization_kwargs: dict | None = None,
                    trace_headers=None, priority: int = 0, data_parallel_rank: int | None = None,
                    prompt_text: str | None = None, reasoning_ended: bool | None = None,
                    reasoning_parser_kwargs: dict | None = None, *, output_kind: OutputKind | None = None,
                    cache_salt: str | None = None, kv_parent: str | None = None,
                    hold_kv: bool = False) -> OutputStream:
        """Validates and queues the request now (vLLM's parameters in vLLM's order; the rest as generate's):
        raises ValueError for an invalid request, QueueFullError at the waiting-queue bound. lora_request: its
        adapter, loaded in the core process if new (a bad one fails the request there: finish_reason "error").
        Returns its outputs (OutputStream): iterated, or awaited and read with get() as vLLM's coroutine gives a
        collector; leaving the iteration early (break, cancel, a closed client) aborts the request, which frees
        its KV blocks. A caller that stops reading must abort() it.
        kv_parent, hold_kv, priority: as Engine.add_request's. output_kind: None takes params.output_kind
        (vLLM's way to ask for deltas)."""
        check_vllm_keywords(data_parallel_rank, reasoning_ended, reasoning_parser_kwargs)
        check_request_types(request_id, prompt, params)
        (prompt,), (params,) = apply_tokenization_kwargs(tokenization_kwargs, [prompt], [params], self.tokenizer)
        q = self._add_request(request_id, prompt, params, output_kind, arrival_time, cache_salt, lora_request,
                              kv_parent, hold_kv, priority)
        return OutputStream(self._outputs(request_id, q))

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
        internal = self._free_id(request_id, sampling_params)
        outputs = None
        try:
            outputs = self.add_request(internal, prompt, sampling_params, None, lora_request, tokenization_kwargs,
                                       trace_headers, priority, data_parallel_rank, prompt_text, reasoning_ended,
                                       reasoning_parser_kwargs, output_kind=output_kind)
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
                     arrival_time: float | None = None, cache_salt: str | None = None, lora_request=None,
                     kv_parent: str | None = None, hold_kv: bool = False, priority: int = 0) -> "OutputQueue":
        """add_request's queueing, its types checked there (before tokenization_kwargs apply)."""
        check_arrival_time(arrival_time)
        kind = OutputKind.of(params) if kind is None else kind
        self.link.attach()
        self.link.check_alive()
        if self._in_use(request_id, params.num_sequences):
            raise ValueError(f"request_id {request_id!r} is already in use")
        self._check_queue_bound(params.num_sequences, "n" if params.best_of is None else "best_of")
        try:
            req = self.input_processor.process(request_id, prompt, params, arrival_time, cache_salt=cache_salt,
                                               lora_request=lora_request, kv_parent=kv_parent, hold_kv=hold_kv,
                                               priority=priority)
            # Its output state first (its detokenizer decodes the prompt's last tokens, which may raise): the
            # core never runs a request that failed here. Then sent (pickled), the output state dropped if it
            # cannot be: either failure is this request's alone. Its outputs cannot overtake the registration:
            # the pipe's reader runs on this loop, after this returns.
            self.output_processor.add_request(request_id, req.prompt, req.prompt_token_ids, req.params, kind,
                                              req.arrival_time, lora_request)
            try:
                self.core.send(("add", req.core_requests))
            except BaseException:
                self.output_processor.abort(request_id)
                raise
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
            internal = f"{request_id}-{next(self._alias_ids)}"
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

    def unhealthy_reason(self) -> str | None:
        """None while the core is healthy (what /health reports); otherwise why not (CoreLink.unhealthy_reason)."""
        return self.link.unhealthy_reason()

    # ---- health, as vLLM's EngineClient reports it ----------------------------------------------------------
    @property
    def dead(self) -> bool:   # the core process has exited, or the engine was shut down
        return self.link.dead

    @property
    def closing(self) -> bool:   # shutting down: the core's exit is expected (the server sets it on a stop signal)
        return self.link.closing

    @closing.setter
    def closing(self, value: bool):
        self.link.closing = value

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
        self.link.attach()   # the core's heartbeats are read from now on
        self.link.check_alive()

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return self.link.loop

    def fail_in_flight(self, reason: str):
        """Every request in flight ends with EngineDeadError(reason) and is aborted (a server stopping)."""
        if self._queues:
            logger.info("%s: ending %d requests in flight", reason, len(self._queues))
        self.link.fail(EngineDeadError(reason), abort=True)

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
        return await self.link.stats()

    # ---- LoRA adapters: loaded and held in the core process (vLLM's names) ----------------------------------
    async def add_lora(self, lora_request) -> bool:
        """Loads the adapter in the core (a loader thread reads it; other requests' steps go on) and returns
        once it is on the host; a bad one raises its ValueError here."""
        return await self.link.call("add_lora", lora_request)

    async def remove_lora(self, lora_id: int) -> bool:
        """False for an unknown adapter or one that unfinished requests use (they finish under it). lora_id: its
        lora_int_id (vLLM's argument name)."""
        return await self.link.call("remove_lora", lora_id)

    async def list_loras(self) -> set[int]:
        return await self.link.call("list_loras")

    async def pin_lora(self, lora_id: int) -> bool:
        """vLLM's: the loaded adapter is never evicted from the core's host LRU (Engine.pin_lora)."""
        return await self.link.call("pin_lora", lora_id)

    async def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        """vLLM's: forget every cached prefix (the GPU, CPU and disk tiers; the latter two are this project's
        counterpart of vLLM's connector, always reset). False while requests hold KV blocks: preempting them first
        (reset_running_requests) is not built, a NotImplementedError. Applied after every message sent before it
        (an abort's blocks are free by then)."""
        return reset_answer(await self.link.call("reset_prefix_cache"), reset_running_requests)

    def shutdown(self, timeout: float | None = None):
        """Stops the core. Streams still read end with EngineDeadError, and later calls raise it (not an OSError
        of the closed pipe). timeout (vLLM's): seconds to wait for the core process's exit before it is killed
        (None: 5)."""
        self.link.shutdown(timeout)

    # ---- outputs from the core (CoreLink calls these) ----------------------------------------------------
    def _process_outputs(self, core_outputs: list[EngineCoreOutput], stats: StepStats):
        try:
            self._process_step(core_outputs, stats)
        except (KeyboardInterrupt, SystemExit):   # not the step's: let through, as the event loop does
            raise
        except BaseException as e:   # a bug here, or the tokenizer's panic (pyo3's PanicException is no Exception):
            # the step's outputs are lost, and its requests' state is unknown
            logger.exception("processing a step's outputs failed: failing %d requests in flight", len(self._queues))
            self._fail_requests(EngineGenerateError(f"the engine failed processing outputs: {e!r}"), abort=True)

    def _process_step(self, core_outputs: list[EngineCoreOutput], stats: StepStats):
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

    def _fail_requests(self, error: Exception, abort: bool):
        for request_id, q in list(self._queues.items()):
            q.put_nowait(error)
            if abort:
                self._abort_one(request_id)
        self._queues.clear()


# vLLM's AsyncLLM methods not built here: a NotImplementedError saying why and what instead (vllm_names.py)
for _name in ASYNC_LLM_NAMES:
    setattr(AsyncLLM, _name, refusing(_name, functools.partial(not_built, "AsyncLLM")))
