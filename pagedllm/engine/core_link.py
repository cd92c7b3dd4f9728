"""CoreLink: AsyncLLM's live link to the engine core process, on the API process's event loop.

It reads the core's pipe (outputs, heartbeats, replies), judges the core's health (its exit, silence past
heartbeat_timeout, one step past step_timeout), answers the calls the core replies to (stats, LoRA) and shuts it
down. What concerns requests stays with AsyncLLM, which hands in three callables: on_step (one step's outputs),
fail_requests (end every request in flight with an error) and num_in_flight (how many there are).
"""
import asyncio
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Callable

from pagedllm.core.messages import EngineCoreOutput
from pagedllm.engine.core_process import HEARTBEAT_INTERVAL, CoreClient
from pagedllm.metrics import SchedulerStats, StepStats

logger = logging.getLogger("pagedllm")


class EngineDeadError(RuntimeError):
    """The engine core process has exited; no request can run any more."""


class CoreLink:
    def __init__(self, core: CoreClient, heartbeat_timeout: float, step_timeout: float,
                 on_dead: Callable[[], None] | None, on_step: Callable[[list[EngineCoreOutput], StepStats], None],
                 fail_requests: Callable[[Exception, bool], None], num_in_flight: Callable[[], int]):
        """core: a ready client (wait_ready returned). heartbeat_timeout, step_timeout, on_dead: AsyncLLM's
        arguments. fail_requests(error, abort): abort also tells the core to free them (it may recover)."""
        self.core = core
        self.heartbeat_timeout = heartbeat_timeout
        self.step_timeout = step_timeout
        self.on_dead = on_dead
        self.on_step, self.fail_requests, self.num_in_flight = on_step, fail_requests, num_in_flight
        self.dead = False
        self.closing = False                          # shutting down: the core's exit is expected
        self.last_heartbeat = time.monotonic()        # of the last message from the core
        self.core_stall = 0.0                         # its step loop's time in one pass, as of that message
        self.loop: asyncio.AbstractEventLoop | None = None
        self._watchdog: asyncio.Task | None = None
        self._stats_waiters: deque[asyncio.Future] = deque()
        self._num_stale_stats = 0                     # replies still due to failed stats() calls
        self._lora_calls: dict[int, asyncio.Future] = {}   # add/remove/list_loras calls by id, until answered
        self._call_ids = itertools.count()
        self._steps: deque[tuple] = deque()           # ("outputs", rows, StepStats) read, not yet processed
        self._step_scheduled = False                  # _process_next_step is due on the event loop

    # ---- calls the core answers ---------------------------------------------------------------------------
    async def stats(self) -> SchedulerStats:
        """The core's counts, taken after every message sent before this call (aborts included)."""
        self.attach()
        self.check_alive()
        fut = self.loop.create_future()
        self._stats_waiters.append(fut)
        self.core.send(("stats",))
        return await fut

    async def call(self, name: str, *args):
        """Answered by call id: an add_lora whose adapter is read on a loader thread answers after later calls."""
        self.attach()
        self.check_alive()
        call_id = next(self._call_ids)
        fut = self._lora_calls[call_id] = self.loop.create_future()
        self.core.send(("lora", call_id, name, *args))
        try:
            return await fut
        finally:
            self._lora_calls.pop(call_id, None)

    def shutdown(self, timeout: float | None = None):
        self.closing = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self.loop is not None and not self.dead:
            self.loop.remove_reader(self.core.conn.fileno())
        self.core.shutdown(timeout)
        was_dead, self.dead = self.dead, True
        if not was_dead and self.loop is not None and not self.loop.is_closed():
            self.fail(EngineDeadError("the engine was shut down"), abort=False)

    # ---- health -------------------------------------------------------------------------------------------
    def check_alive(self):
        reason = self.unhealthy_reason()
        if reason is not None:
            raise EngineDeadError(reason)

    def unhealthy_reason(self) -> str | None:
        """None while the core is healthy (what /health reports); otherwise why not: its process exited, it
        sent nothing for heartbeat_timeout (stopped), or one pass of its loop has run past step_timeout (hung).
        Messages already in the pipe count: a busy (or not yet attached) event loop may not have read them."""
        reason = self._judge()
        if reason is not None and not self.dead and self.loop is not None:
            self._on_readable()
            reason = self._judge()
        return reason

    def _judge(self) -> str | None:
        if self.dead:
            return "the engine was shut down" if self.closing else "the engine core process has exited"
        if self.loop is None:   # nothing reads the pipe yet: its heartbeats wait there, only an exit tells
            return None if self.core.process.is_alive() else "the engine core process has exited"
        if time.monotonic() - self.last_heartbeat > self.heartbeat_timeout:
            return f"the engine core has not responded for {self.heartbeat_timeout:g} s"
        if self.core_stall > self.step_timeout:
            return f"the engine core's step has run for more than {self.step_timeout:g} s"
        return None

    # ---- the pipe, read on the event loop -----------------------------------------------------------------
    def attach(self):
        """Read the core's pipe from this event loop, and watch the core (bound on first use, or by the server
        at start-up: the loop may not exist at init)."""
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
            self.loop.add_reader(self.core.conn.fileno(), self._on_readable)
            self._watchdog = self.loop.create_task(self._watch())
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
            self.on_step([EngineCoreOutput(*row) for row in msg[1]], msg[2])
        finally:
            if self._steps:
                self._step_scheduled = True
                self.loop.call_soon(self._process_next_step)

    # ---- the core's failure -------------------------------------------------------------------------------
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
            elif ((self.num_in_flight() or self._stats_waiters or self._lora_calls)
                  and (reason := self.unhealthy_reason()) and not self.dead):
                logger.error("%s: failing %d requests in flight", reason, self.num_in_flight())
                self.fail(EngineDeadError(reason), abort=True)

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
                         code, self.num_in_flight())
        self.dead = True
        self.loop.remove_reader(self.core.conn.fileno())
        self.fail(EngineDeadError("the engine core process has exited"), abort=False)
        if self.on_dead is not None and not self.closing:
            self.on_dead()

    def fail(self, error: Exception, abort: bool):
        """Every request in flight, and every call waiting for the core, ends with error."""
        self.fail_requests(error, abort)
        self._num_stale_stats += len(self._stats_waiters)
        while self._stats_waiters:
            fut = self._stats_waiters.popleft()
            if not fut.done():
                fut.set_exception(error)
        for fut in self._lora_calls.values():
            if not fut.done():
                fut.set_exception(error)
