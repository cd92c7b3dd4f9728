"""Text prompts that arrive together are tokenized in one batched call.

A burst of requests (300 streams at once, each a 512-token text) queued one `encode` a request on the
tokenizer thread: ~1.7 ms each here, so the last request's prefill waited ~0.5 s for its turn. A fast
tokenizer encodes a list across all cores (Rust, without the GIL): the same 300 texts take 0.32 s on 2 cores
and less the more cores there are. Texts that arrive while a batch runs go in the next one, so a lone
request waits for nothing. Results equal `tokenizer.encode(text, add_special_tokens=...)`.
"""
import asyncio
from collections.abc import Callable
from concurrent.futures import Executor


class BatchEncoder:
    def __init__(self, tokenizer: Callable[[], object], executor: Executor):
        """tokenizer: returns the tokenizer at batch time; executor: the thread the batches run on."""
        self._tokenizer = tokenizer
        self._executor = executor
        self._pending: list[tuple[str, bool, asyncio.Future]] = []
        self._drainer: asyncio.Task | None = None   # held: the event loop keeps only weak references to tasks
        self.num_batches = 0   # batched calls made (tests, and to see that bursts are batched)

    async def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((text, add_special_tokens, future))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self):
        """Runs batches until none is pending; texts that arrive meanwhile join the next one."""
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending, []
            self.num_batches += 1
            try:
                results = await loop.run_in_executor(self._executor, self._encode_all, batch)
            except BaseException as e:   # the executor shut down (server stopping), or a cancellation
                results = [e] * len(batch)
            for (_, _, future), result in zip(batch, results):
                if future.done():   # its request was cancelled (the client left)
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    def _encode_all(self, batch: list[tuple[str, bool, asyncio.Future]]) -> list:
        """Each text's ids (or the exception that its own encode raised), one tokenizer call per setting."""
        tokenizer = self._tokenizer()
        results: list = [None] * len(batch)
        for add_special in {b[1] for b in batch}:
            rows = [i for i, b in enumerate(batch) if b[1] == add_special]
            try:
                ids = tokenizer([batch[i][0] for i in rows], add_special_tokens=add_special,
                                return_attention_mask=False, return_token_type_ids=False)["input_ids"]
            except BaseException:   # one bad text fails the whole call: encode each alone to blame the right one
                ids = [_encode_one(tokenizer, batch[i][0], add_special) for i in rows]
            for i, row_ids in zip(rows, ids):
                results[i] = row_ids
        return results


def _encode_one(tokenizer, text: str, add_special_tokens: bool):
    """The ids, or the exception of this text. A Rust tokenizer's panic (pyo3's PanicException: no Exception, so
    past the server's error handlers) becomes one, naming it. On the tokenizer thread: no Ctrl-C comes here."""
    try:
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)
    except Exception as e:
        return e
    except BaseException as e:
        return RuntimeError(f"the tokenizer failed on this text: {type(e).__name__}: {e}")
