"""CPU cost of the API process's output path per token event, in one process, without HTTP: a step's pickled
outputs as they come from the engine core's pipe -> AsyncLLM (unpickle, OutputProcessor: detokenize, stop
checks, RequestOutput; the request's queue) -> the server's stream (merge, completions' SSE chunk) -> the bytes
the response hands to the ASGI server's send. Many streams at once, one token each a step
(benchmarks/api_cost.py --fake-core measures the same path end to end, with uvicorn, sockets and a client
sharing the CPU).

    python benchmarks/stream_path_cost.py TOKENIZER_DIR [--streams 300 --steps 128 --reps 5]

Prints one JSON line: CPU microseconds (process time: other load on the machine counts less) per token event
(min and median over reps), in total and for the engine side alone (pipe message to queued RequestOutput).
"""
import argparse
import asyncio
import collections
import json
import pickle
import statistics
import time
from types import SimpleNamespace

from pagedllm.core.messages import EngineCoreOutput
from pagedllm.engine.async_llm import AsyncLLM

try:
    from pagedllm.engine.async_llm import OutputQueue
except ImportError:   # before 2026-12-03: asyncio.Queue
    OutputQueue = None
try:
    from pagedllm.engine.core_link import CoreLink
except ImportError:   # before 2026-12-06: the pipe's reader was AsyncLLM's own
    CoreLink = None
from pagedllm.engine.output_processor import OutputKind, OutputProcessor
from pagedllm.engine.tokenizer import load_tokenizer
from pagedllm.metrics import StepStats
from pagedllm.sampling_params import SamplingParams
from pagedllm.server import completions
from pagedllm.server.metrics import ServerMetrics
from pagedllm.server.protocol import CompletionRequest
from pagedllm.server.serving import merge, open_stream

try:
    from pagedllm.server.serving import SSEResponse
except ImportError:   # before 2026-12-04: sse_stream, a generator around the chunks, under StreamingResponse
    from pagedllm.server.serving import sse_stream
    SSEResponse = None

_TEXT = ("The quick brown fox jumps over the lazy dog while the committee reviews the annual report on regional "
         "water use, noting that 12.5% of households changed suppliers in 2025. Researchers in Zürich agreed. ")


def _engine(tokenizer) -> AsyncLLM:
    """An AsyncLLM with no core process: only what the output path touches."""
    engine = AsyncLLM.__new__(AsyncLLM)
    engine.output_processor = OutputProcessor(tokenizer)
    engine.core = SimpleNamespace(send=lambda msg: None)
    engine.on_step_stats = ServerMetrics("model").record
    engine._queues, engine._unscheduled, engine._aliases, engine.log_requests = {}, set(), {}, False
    engine.shared_waiting, engine._num_published = None, 0   # one API process (before 2026-12-04: unused)
    engine._steps, engine._step_scheduled = collections.deque(), False
    engine._loop = asyncio.get_running_loop()
    if CoreLink is not None:   # the pipe's reader: only its step pacing, which hands each step to the engine
        engine.link = link = CoreLink.__new__(CoreLink)
        link._steps, link._step_scheduled, link.loop = engine._steps, False, engine._loop
        link.on_step = engine._process_outputs
    return engine


def _add(engine: AsyncLLM, request_id: str, max_tokens: int):
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    engine.output_processor.add_request(request_id, None, [1, 2, 3], params, OutputKind.DELTA, time.time())
    engine._queues[request_id] = q = (OutputQueue or asyncio.Queue)()
    try:
        return engine._outputs(request_id, q)
    except TypeError:   # before 2026-12-03 (the kind was passed, to merge steps)
        return engine._outputs(request_id, q, OutputKind.DELTA)


async def _consume(engine, request_id: str, outputs, sink: list):
    req = CompletionRequest(model="model", prompt=[1, 2, 3], max_tokens=1, stream=True)
    ctx = SimpleNamespace(model_name="model")
    outputs = await open_stream(None, engine, [request_id], merge([outputs]), None)
    chunks = completions._stream(ctx, req, "cmpl-x", [""], 3, outputs, [""])
    if SSEResponse is None:
        async for chunk in sse_stream(engine, [request_id], chunks):
            sink[0] += len(chunk.encode())
        return

    async def send(message):   # the ASGI server's send, writing nothing
        sink[0] += len(message.get("body", b""))
    await SSEResponse(engine, [request_id], chunks).stream_response(send)


async def one_rep(tokenizer, ids: list[int], num_streams: int, num_steps: int) -> tuple[float, float]:
    engine = _engine(tokenizer)
    req_ids = [f"r{i}" for i in range(num_streams)]
    sink = [0]
    tasks = [asyncio.create_task(_consume(engine, r, _add(engine, r, num_steps), sink)) for r in req_ids]
    msgs = [pickle.dumps(("outputs", [(r, [ids[(s + i) % len(ids)]], None, None,
                                       "length" if s == num_steps - 1 else None, None, 0, None, False)
                                      for i, r in enumerate(req_ids)], StepStats()))
            for s in range(num_steps)]
    await asyncio.sleep(0)
    engine_side = 0.0
    start = time.process_time()
    for blob in msgs:
        t = time.process_time()
        msg = pickle.loads(blob)
        if CoreLink is not None:
            engine.link._steps.append(msg)
            engine.link._process_next_step()
        elif hasattr(engine, "_process_next_step"):   # before 2026-12-06 (CoreLink)
            engine._steps.append(msg)
            engine._process_next_step()
        else:   # before 2026-12-03
            engine._process_outputs([EngineCoreOutput(*row) for row in msg[1]], msg[2])
        engine_side += time.process_time() - t
        await asyncio.sleep(0)   # the streams write this step's chunks
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    events = num_streams * num_steps
    return (time.process_time() - start) / events * 1e6, engine_side / events * 1e6


async def _until_disconnect_stub(raw_request, work):   # open_stream's disconnect watch needs a real request
    return await work


def _server_gc():
    """The garbage collector as `pagedllm serve` sets it up (frozen start-up objects, its thresholds)."""
    import gc

    from pagedllm.engine.core_process import freeze_gc
    from pagedllm.server import api_server
    freeze_gc()
    threshold = getattr(api_server, "API_GC_THRESHOLD", None)   # since 2026-12-03
    if threshold is not None:
        gc.set_threshold(threshold, 10, 10)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tokenizer")
    p.add_argument("--streams", type=int, default=300)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    from pagedllm.server import serving
    serving.until_disconnect = _until_disconnect_stub
    tokenizer = load_tokenizer(args.tokenizer)
    ids = tokenizer.encode(_TEXT * 4, add_special_tokens=False)
    _server_gc()
    try:
        import uvloop
        run = uvloop.run
    except ImportError:
        run = asyncio.run
    runs = [run(one_rep(tokenizer, ids, args.streams, args.steps)) for _ in range(args.reps)]
    total, engine_side = [r[0] for r in runs], [r[1] for r in runs]
    print(json.dumps({"streams": args.streams, "steps": args.steps,
                      "us_per_event_min": round(min(total), 2),
                      "us_per_event_median": round(statistics.median(total), 2),
                      "engine_side_us_min": round(min(engine_side), 2),
                      "server_side_us_min": round(min(t - e for t, e in zip(total, engine_side)), 2)}))


if __name__ == "__main__":
    main()
