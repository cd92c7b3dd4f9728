"""Adapters read from disk off the step loop: a request whose adapter is not on the host waits for it.

Reading an adapter (two files, sha256 for its block-hash identity, a dtype cast, pinning on CUDA) takes from a
few ms to seconds (a large adapter on a network disk). `EngineCore.add_request` runs between steps, so it
only starts the read here; worker threads do it (file reads, hashing and torch copies release the GIL) while
steps go on, and each step `poll` hands the finished ones to the step thread, which alone puts them in the
host LRU (`LoRAManager.insert`: `prepare_step` reads it) and lets their requests be scheduled. One read per
adapter: requests and `add_lora` calls for an adapter being read wait for the same read. A read that fails
fails the requests that wait for it, and only them.
"""
import concurrent.futures
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

from pagedllm.daemon_threads import DaemonThreads
from pagedllm.lora.manager import LoRAManager
from pagedllm.lora.peft_loader import LoRAModel, lora_cache_key
from pagedllm.lora.request import LoRAAdapterNotFoundError, LoRARequest


@dataclass
class PendingLoad:
    request: LoRARequest
    future: Future                                       # of the staged LoRAModel
    req_ids: list[str] = field(default_factory=list)     # requests waiting for it
    callers: list[Future] = field(default_factory=list)  # add_lora calls waiting for it (-> True / the error)


@dataclass
class LoadResult:
    """A finished read, installed: the requests that waited, with the adapter's block-hash key or the error."""
    req_ids: list[str]
    lora_key: tuple | None
    error: str | None


class LoRALoader:
    def __init__(self, manager: LoRAManager, max_workers: int = 2):
        self.manager = manager
        self.pending: dict[int, PendingLoad] = {}   # lora_int_id -> its read in progress
        self._workers = DaemonThreads("lora-loader", max_workers)

    def key_if_loaded(self, req: LoRARequest) -> tuple | None:
        """The adapter's block-hash key when it is on the host (a mismatch with a loaded or loading adapter of
        the same id raises), else None: the caller waits for it (`wait_for`)."""
        load = self.pending.get(req.lora_int_id)
        if load is not None and load.request.identity != req.identity:
            raise ValueError(f"lora_int_id {req.lora_int_id} is already adapter {load.request.lora_name!r} "
                             f"({load.request.lora_path}), not {req.lora_name!r} ({req.lora_path})")
        lora = self.manager.cached(req)
        return None if lora is None else lora_cache_key(lora)

    def wait_for(self, req: LoRARequest, req_id: str | None = None, caller: Future | None = None):
        """Starts the adapter's read unless it is under way; the request (or add_lora call) waits for it."""
        load = self.pending.get(req.lora_int_id)
        if load is None:
            load = self.pending[req.lora_int_id] = PendingLoad(req, self._workers.submit(self.read, req))
        if req_id is not None:
            load.req_ids.append(req_id)
        if caller is not None:
            load.callers.append(caller)

    def poll(self) -> Iterator[LoadResult]:
        """On the step thread: the finished reads, put in the host LRU one at a time (the caller acquires each
        for its requests before the next insert may evict it); their add_lora calls answered."""
        for lid in [lid for lid, load in self.pending.items() if load.future.done()]:
            load = self.pending.pop(lid)
            key, error, kind = None, None, ValueError
            try:
                key = lora_cache_key(self.manager.insert(load.future.result()))
            except Exception as e:   # noqa: BLE001 - the adapter's error goes to its requests and callers
                error = describe_load_error(load.request, e)
                kind = LoRAAdapterNotFoundError if isinstance(e, LoRAAdapterNotFoundError) else ValueError
            for caller in load.callers:
                caller.set_result(True) if error is None else caller.set_exception(kind(error))
            yield LoadResult(load.req_ids, key, error)

    def wait(self, seconds: float):
        """Blocks until a read finishes or `seconds` pass (nothing else to do: no spinning on the GIL)."""
        futures = [load.future for load in self.pending.values()]
        concurrent.futures.wait(futures, timeout=seconds, return_when=concurrent.futures.FIRST_COMPLETED)

    def read(self, req: LoRARequest) -> LoRAModel:
        """One adapter from disk, staged (a test may wrap it: a slow disk)."""
        return self.manager.load(req)


def describe_load_error(req: LoRARequest, e: Exception) -> str:
    """The error names the adapter (peft_loader's ValueErrors do; an OSError or a corrupt file may not)."""
    text = str(e)
    if f"LoRA adapter {req.lora_name!r}" not in text:
        text = f"LoRA adapter {req.lora_name!r} ({req.lora_path}) could not be loaded: {type(e).__name__}: {text}"
    return text
