"""What AsyncLLM hands its callers to wait on: a request's OutputQueue, read by its stream, OutputStream, what
add_request returns, and Aborted, what abort() returns."""
import asyncio
from collections import deque


class Aborted:
    """What abort returns: done already, so awaiting it (vLLM's callers do) returns at once. Not a coroutine, so
    the callers that do not await it (a stream's finally, the server) still abort."""
    __slots__ = ()

    def __await__(self):
        return iter(())


ABORTED = Aborted()


class OutputStream:
    """A request's outputs, as add_request returns them: iterated (`async for`; leaving early aborts the request),
    or awaited first, as vLLM's add_request is a coroutine that gives a collector, then read with get() until an
    output is finished (vLLM's RequestOutputCollector.get; its outputs here are never merged)."""
    __slots__ = ("_outputs",)

    def __init__(self, outputs):
        self._outputs = outputs   # AsyncLLM._outputs' generator: its finally aborts a request left early

    def __aiter__(self):
        return self._outputs

    def __anext__(self):
        return self._outputs.__anext__()

    def aclose(self):
        return self._outputs.aclose()

    def __await__(self):
        return self
        yield   # a generator: awaiting it returns the stream itself at once

    async def get(self):
        """The next output (vLLM's collector's call): StopAsyncIteration after the finished one."""
        return await self._outputs.__anext__()


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
