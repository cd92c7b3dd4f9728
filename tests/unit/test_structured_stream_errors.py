"""A request the engine fails with status 400 (a constraint that did not compile, or not in time) is an HTTP 400
naming the field, streamed or not: a stream awaits its first output before its status line (serving.open_stream).
Fakes stand in for AsyncLLM and the client's connection."""
import asyncio

import pytest

from pagedllm.engine.async_llm import EngineGenerateError
from pagedllm.server import serving
from pagedllm.server.errors import APIError


class FakeEngine:
    def __init__(self):
        self.aborted = []

    def abort(self, request_id):
        self.aborted.append(request_id)


class Connected:
    async def receive(self):
        await asyncio.sleep(3600)   # the client stays


def compile_failure() -> EngineGenerateError:
    return EngineGenerateError("the grammar did not compile in 5 s", status=400)


async def failing(error):
    raise error
    yield   # an async generator


async def outputs(*items):
    for item in items:
        await asyncio.sleep(0)
        yield item


def test_a_400_from_the_engine_is_an_api_error_naming_the_field_before_the_stream_starts():
    engine = FakeEngine()
    with pytest.raises(APIError) as e:
        asyncio.run(serving.open_stream(Connected(), engine, ["r-0"], failing(compile_failure()), "response_format"))
    assert (e.value.status, e.value.param) == (400, "response_format") and "did not compile" in e.value.message
    assert engine.aborted == ["r-0"]


def test_other_engine_failures_stay_500s():
    with pytest.raises(EngineGenerateError):
        asyncio.run(serving.open_stream(Connected(), FakeEngine(), ["r-0"], failing(EngineGenerateError("x")), None))


def test_the_stream_keeps_its_first_output():
    async def run():
        stream = await serving.open_stream(Connected(), FakeEngine(), ["r-0"], outputs(1, 2, 3), None)
        return [item async for item in stream]
    assert asyncio.run(run()) == [1, 2, 3]


def test_non_streamed_final_outputs_name_the_field():
    with pytest.raises(APIError) as e:
        asyncio.run(serving.final_outputs([failing(compile_failure())], "guided_json"))
    assert e.value.param == "guided_json"
