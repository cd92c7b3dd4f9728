"""The server's batched tokenization: a burst of texts shares tokenizer calls and gets exactly encode's ids."""
import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from pagedllm.engine.tokenizer import load_tokenizer
from pagedllm.server.batch_encoder import BatchEncoder
from tests.conftest import DEMO_DIR

TEXTS = ["Once upon a time", "", "a little girl named Lily went to the park. " * 20, "Tom and\nthe dog", "zzz qq"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(DEMO_DIR))


def run(tokenizer, coro_fn):
    async def main():
        pool = ThreadPoolExecutor(1)
        try:
            encoder = BatchEncoder(lambda: tokenizer, pool)
            return await coro_fn(encoder), encoder
        finally:
            pool.shutdown()
    return asyncio.run(main())


def test_a_burst_is_batched_and_equals_encode(tokenizer):
    requests = [(t, i % 3 != 0) for i, t in enumerate(TEXTS * 8)]   # both add_special_tokens settings

    async def burst(encoder):
        return await asyncio.gather(*(encoder.encode(t, s) for t, s in requests))

    got, encoder = run(tokenizer, burst)
    assert got == [tokenizer.encode(t, add_special_tokens=s) for t, s in requests]
    assert any(g != tokenizer.encode(t, add_special_tokens=not s) for g, (t, s) in zip(got, requests))
    assert encoder.num_batches <= 2   # the first request's batch, then everything that came meanwhile


def test_requests_apart_wait_for_no_batch(tokenizer):
    async def apart(encoder):
        return [await encoder.encode(t, True) for t in TEXTS]

    got, encoder = run(tokenizer, apart)
    assert got == [tokenizer.encode(t) for t in TEXTS]
    assert encoder.num_batches == len(TEXTS)


def test_a_bad_text_fails_alone(tokenizer):
    async def mixed(encoder):
        return await asyncio.gather(*(encoder.encode(t, True) for t in ["fine", None, "also fine"]),
                                    return_exceptions=True)

    got, _ = run(tokenizer, mixed)
    assert got[0] == tokenizer.encode("fine") and got[2] == tokenizer.encode("also fine")
    assert isinstance(got[1], Exception)


def test_a_cancelled_request_leaves_the_others_their_ids(tokenizer):
    async def cancel_one(encoder):
        tasks = [asyncio.create_task(encoder.encode(t, True)) for t in TEXTS]
        await asyncio.sleep(0)
        tasks[1].cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        return results, await encoder.encode("after", True)

    (results, after), _ = run(tokenizer, cancel_one)
    assert isinstance(results[1], asyncio.CancelledError)
    assert [r for i, r in enumerate(results) if i != 1] == [tokenizer.encode(t) for i, t in enumerate(TEXTS) if i != 1]
    assert after == tokenizer.encode("after")


def test_a_stopped_executor_fails_the_waiters():
    async def main():
        pool = ThreadPoolExecutor(1)
        pool.shutdown()
        encoder = BatchEncoder(lambda: None, pool)
        with pytest.raises(RuntimeError):
            await encoder.encode("x", True)
    asyncio.run(main())


class PanicException(BaseException):
    """As pyo3's: a Rust tokenizer's panic on a text (tiktoken on a long run of one character, openai/tiktoken#15)
    reaches Python as a BaseException, not an Exception."""


class _PanicsOn:
    def __init__(self, tokenizer, text: str):
        self.tokenizer, self.text = tokenizer, text

    def __call__(self, texts, **kwargs):
        if self.text in texts:
            raise PanicException("no entry found for key")
        return self.tokenizer(texts, **kwargs)

    def encode(self, text, **kwargs):
        if text == self.text:
            raise PanicException("no entry found for key")
        return self.tokenizer.encode(text, **kwargs)


def test_a_text_the_tokenizer_panics_on_fails_alone_with_an_exception(tokenizer):
    """The batch's call panics on one text: it was no Exception, so the texts were not encoded one by one to blame
    it, and every request of the batch failed with the panic (past the server's error handlers, which take an
    Exception: a bare 500 from uvicorn). That text alone fails now, with an error naming the panic."""
    async def mixed(encoder):
        return await asyncio.gather(*(encoder.encode(t, True) for t in ["fine", "^" * 100, "also fine"]),
                                    return_exceptions=True)

    got, _ = run(_PanicsOn(tokenizer, "^" * 100), mixed)
    assert got[0] == tokenizer.encode("fine") and got[2] == tokenizer.encode("also fine")
    assert isinstance(got[1], Exception) and "no entry found for key" in str(got[1]), got[1]
