"""A few worker threads that run calls into Futures, for work kept off the step loop (grammar compiles, LoRA
adapter reads).

Daemon threads, not a ThreadPoolExecutor: its workers are joined at exit, and a call that runs for minutes (a
grammar that compiles that long, a read stuck on a dead network disk) would hold the engine's exit that long.
The threads start with the first call: an engine that never needs them never starts them.
"""
import queue
import threading
from concurrent.futures import Future


class DaemonThreads:
    def __init__(self, name: str, num_threads: int):
        self.name, self.num_threads = name, num_threads
        self._jobs: queue.SimpleQueue | None = None
        self._lock = threading.Lock()

    def submit(self, fn, *args, future: Future | None = None) -> Future:
        """fn(*args) on a worker; its result or exception in `future` (a new one unless given)."""
        future = Future() if future is None else future
        with self._lock:
            if self._jobs is None:
                self._jobs = queue.SimpleQueue()
                for i in range(self.num_threads):
                    threading.Thread(target=self._work, name=f"{self.name}-{i}", daemon=True).start()
        self._jobs.put((fn, args, future))
        return future

    def _work(self):
        while True:
            fn, args, future = self._jobs.get()
            try:
                future.set_result(fn(*args))
            except BaseException as e:   # the future carries it to whoever waits
                future.set_exception(e)
