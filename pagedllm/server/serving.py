"""Running parsed requests through AsyncLLM: shared checks, adding a request's prompts, merging their
streams, server-sent events, and aborting on a closed connection.

Invariant: every engine request a handler adds is aborted in a `finally` (a no-op once it has finished),
so no error, cancellation or closed connection can leave KV blocks behind.
"""
import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from json.encoder import encode_basestring_ascii

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from pagedllm import chat_template
from pagedllm.beam_search import BeamSearchParams
from pagedllm.engine.async_llm import AsyncLLM, EngineGenerateError
from pagedllm.engine.output_processor import OutputKind
from pagedllm.lora.request import LoRARequest
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams
from pagedllm.server import reasoning
from pagedllm.server.batch_encoder import BatchEncoder
from pagedllm.server.beam_search import beam_search_stream, check_beam_search
from pagedllm.server.errors import APIError, error_body, shorten
from pagedllm.server.lora import ServingLoRAs
from pagedllm.server.request_logger import RequestLogger
from pagedllm.server.response_store import ResponseStore

DONE = "data: [DONE]\n\n"


@dataclass
class ServingContext:
    engine: AsyncLLM
    model_name: str
    chat_template: str | None
    model_aliases: list[str] = field(default_factory=list)   # the other --served-model-name names
    trust_request_chat_template: bool = False   # --trust-request-chat-template: requests may bring a template
    return_tokens_as_token_ids: bool = False    # --return-tokens-as-token-ids: the requests' default
    tool_call_parser: str | None = None     # --tool-call-parser, --enable-auto-tool-choice (chat_tools.py)
    enable_auto_tool_choice: bool = False
    reasoning_parser: str | None = None     # --reasoning-parser (reasoning.py)
    loras: ServingLoRAs | None = None       # --enable-lora: the adapters served by name (server/lora.py)
    responses: ResponseStore | None = None  # --responses-store: /v1/responses kept for store true
    request_logger: RequestLogger | None = None   # --enable-log-requests
    startup_error: str | None = None        # why the app's start-up failed (a bad --lora-modules adapter)
    # vLLM's chat and usage flags (ServerConfig)
    response_role: str = "assistant"
    default_chat_template_kwargs: dict | None = None
    chat_template_content_format: str = "auto"
    exclude_tools_when_tool_choice_none: bool = False
    enable_prompt_tokens_details: bool = False
    enable_force_include_usage: bool = False
    enable_per_request_metrics: bool = False   # answers of one sequence carry `metrics` (request_metrics.py)
    system_fingerprint: str | None = None   # --fingerprint-mode's (system_fingerprint()); None: no such field
    # One thread, as vLLM's: tokenizing a long text takes seconds (~0.7 s a MB), which on the event loop
    # would stall every stream and /health; HF fast tokenizers release the GIL while they work.
    tokenizer_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="pagedllm-tokenizer"))
    encoder: BatchEncoder = field(init=False)   # text prompts, batched on that thread
    think_ids: tuple[int, int] | None = field(init=False, default=None)   # <think>, </think> (reasoning_parser)
    turn_id: int | None = field(init=False, default=None)   # the token opening a chat turn (reasoning_parser)

    def __post_init__(self):
        reserved = sorted(chat_template.RESERVED_TEMPLATE_KWARGS & (self.default_chat_template_kwargs or {}).keys())
        if reserved:   # a start-up error, not every chat request's 400
            raise ValueError(f"default_chat_template_kwargs may not set {reserved[0]!r}: it is not a template "
                             f"variable")
        self.encoder = BatchEncoder(lambda: self.engine.tokenizer, self.tokenizer_pool)
        if self.reasoning_parser is not None:
            self.think_ids = reasoning.think_token_ids(self.tokenizer, self.reasoning_parser)
            self.turn_id = reasoning.turn_start_token_id(self.tokenizer)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    async def off_loop_if(self, slow: bool, fn: Callable, *args, **kwargs):
        """fn on the tokenizer thread where it may be slow (a structured output constraint to parse), else at once:
        a cheap call queued behind a batch of prompts being tokenized would wait the whole batch."""
        return await self.off_loop(fn, *args, **kwargs) if slow else fn(*args, **kwargs)

    async def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """tokenizer.encode(text, add_special_tokens=...), batched with the texts of other requests."""
        return await self.encoder.encode(text, add_special_tokens)

    async def off_loop(self, fn: Callable, *args, **kwargs):
        """fn(*args, **kwargs) on the tokenizer thread (tokenizing, the chat template, detokenizing a prompt).
        Its results are the same as on the loop: one tokenizer, used with fixed settings."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_pool, partial(fn, *args, **kwargs))

    def check_model(self, name: str | None) -> LoRARequest | None:
        """The adapter a request's model names (None or "": the base model, as vLLM's); an unknown name is vLLM's
        404."""
        if not name or name == self.model_name or name in self.model_aliases:
            return None
        lora = self.loras.get(name) if self.loras is not None else None
        if lora is None:
            adapters = f" and {len(self.loras.adapters)} LoRA adapters (GET /v1/models)" if self.loras else ""
            aliases = "".join(f", `{a}`" for a in self.model_aliases)
            raise APIError(404, f"The model `{shorten(name)}` does not exist (this server serves "
                                f"`{self.model_name}`{aliases}{adapters}).", "model", "model_not_found")
        return lora

    def served_name(self, name: str | None) -> str:
        """The model a response names, for a request's model that check_model took: an adapter's name, else the
        first --served-model-name, whichever of the base model's names (or none) the request gave (vLLM's
        models.model_name)."""
        return self.model_name if not name or name in self.model_aliases else name

    async def resolve_model(self, name: str | None) -> LoRARequest | None:
        """check_model, then vLLM's filesystem resolver for a name no adapter has yet (ServingLoRAs.resolve)."""
        try:
            return self.check_model(name)
        except APIError as e:
            if self.loras is None or e.status != 404 or (lora := await self.loras.resolve(name)) is None:
                raise
            return lora

    def default_max_tokens(self, num_prompt_tokens: int) -> int | None:
        """max_tokens of a request that leaves it unset, as vLLM's get_max_tokens: the generation config's
        max_new_tokens, capped at what the prompt leaves of max_model_len; None without one (up to max_model_len)
        or when the prompt leaves no room (check_context_length then names the prompt)."""
        default = self.engine.default_sampling_params.get("max_tokens")
        room = self.engine.max_model_len - num_prompt_tokens
        return min(default, room) if default is not None and room >= 1 else None

    def capped_max_tokens(self, max_tokens: int | None) -> int | None:
        """max_tokens within vLLM's override_max_tokens, which caps every request's (after the context check, which
        reads the request's own): the max_new_tokens of --generation-config DIR's file (and of
        --override-generation-config over it), or with auto / vllm of --override-generation-config alone (the
        model's own generation config only fills an unset max_tokens)."""
        config = getattr(self.engine, "config", None)
        if getattr(config, "generation_config", "auto") in ("auto", "vllm"):
            cap = (getattr(config, "override_generation_config", None) or {}).get("max_new_tokens")
        else:
            cap = self.engine.default_sampling_params.get("max_tokens")
        return max_tokens if cap is None or max_tokens is None else min(max_tokens, cap)

    def check_context_length(self, num_prompt_tokens: int, max_tokens: int | None, prompt_param: str,
                             max_tokens_param: str):
        """A prompt must leave room for max_tokens (at least one token when max_tokens is unset) in the model's
        context and in the KV cache. The error names the cause: the prompt when it alone leaves no room."""
        limit, completion = self.engine.max_model_len, max_tokens or 1
        if num_prompt_tokens + completion > limit:
            param = prompt_param if num_prompt_tokens >= limit else max_tokens_param
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{num_prompt_tokens + completion} tokens ({num_prompt_tokens} in the prompt, "
                                f"{max_tokens or 'at least 1'} for the completion). Reduce `{param}`.",
                           param, "context_length_exceeded")
        # The KV cache must hold the whole sequence (the engine's own check, InputProcessor._resolve_max_tokens).
        capacity = self.engine.input_processor.max_kv_tokens
        total = num_prompt_tokens + (max_tokens or limit - num_prompt_tokens)
        if total > capacity:
            param = prompt_param if num_prompt_tokens >= capacity else max_tokens_param
            raise APIError(400, f"The KV cache holds {capacity} tokens. However, you requested "
                                f"{total} tokens ({num_prompt_tokens} in the prompt, {total - num_prompt_tokens} "
                                f"for the completion{'' if max_tokens else ': set max_tokens'}). Reduce `{param}`.",
                           param, "context_length_exceeded")


def system_fingerprint(engine_config, mode: str = "full", value: str | None = None) -> str | None:
    """vLLM's --fingerprint-mode: full = pagedllm-<version>[-tp<N>]-<hash8>, hash = pagedllm-<version>-<hash8>,
    custom = value, none = None. hash8: the engine config's fields (the model, its dtype, the cache, the
    parallelism, ...), as vLLM's vllm_config.compute_hash: answers under one fingerprint come from one set-up; the
    same on every API process of the server."""
    if mode == "none":
        return None
    if mode == "custom":
        return value
    import dataclasses
    import hashlib
    from pagedllm import __version__
    values = dataclasses.asdict(engine_config)
    values.pop("profiler_config", None)   # changes no answer (vLLM's compute_hash leaves it out too)
    fields = json.dumps(values, sort_keys=True, default=str)
    parts = [f"pagedllm-{__version__}"]
    tp = getattr(engine_config, "tensor_parallel_size", 1)
    if mode == "full" and tp > 1:
        parts.append(f"tp{tp}")
    return "-".join([*parts, hashlib.sha256(fields.encode()).hexdigest()[:8]])


def fingerprint(ctx: ServingContext) -> dict:
    """{"system_fingerprint": ...} for an answer or a chunk, or {} without a fingerprint."""
    return {} if ctx.system_fingerprint is None else {"system_fingerprint": ctx.system_fingerprint}


def fingerprint_json(ctx: ServingContext) -> str:
    """',"system_fingerprint":...' for a hand-written chunk's end, or "" without a fingerprint."""
    return "" if ctx.system_fingerprint is None else f',"system_fingerprint":{json_value(ctx.system_fingerprint)}'


def response_id_for(prefix: str, raw_request: Request, request_id: str | None, default: str) -> str:
    """A response's id, vLLM's: prefix + the X-Request-Id header (a gateway's trace id), else the body's
    request_id; default without either. It names the answer only: the engine's request ids are the server's own."""
    base = raw_request.headers.get("x-request-id") or request_id
    return prefix + base if base else default


def add_requests(engine: AsyncLLM, request_id: str, prompts: list[list[int]],
                 params: SamplingParams | BeamSearchParams | list[SamplingParams], kind: OutputKind,
                 lora_request: LoRARequest | None = None, priority: int = 0,
                 cache_salt: str | None = None,
                 log: RequestLogger | None = None) -> tuple[list[AsyncIterator[RequestOutput]], list[str]]:
    """All prompts or none: when one is refused, the ones already added are aborted. BeamSearchParams: one
    beam search per prompt, each a stream of one final output (its step requests are its own to abort; each
    search has a salt of its own, which keeps out other requests whatever their cache_salt). cache_salt: only
    requests of the same salt share cached blocks; with prefix caching off it has nothing to share. A list of
    SamplingParams: each prompt's own. log: --enable-log-requests' logger (None: off)."""
    if not engine.input_processor.enable_prefix_caching:
        cache_salt = None   # the engine's rule then: a request shares blocks with its own n sequences only
    if isinstance(params, BeamSearchParams):
        check_beam_search(engine, params, priority)
        for i, p in enumerate(prompts) if log is not None else ():
            log.log(f"{request_id}-{i}", p, params, lora_request)
        return [beam_search_stream(engine, f"{request_id}-{i}", p, params, lora_request, priority)
                for i, p in enumerate(prompts)], []
    streams, ids = [], []
    try:
        for i, prompt_ids in enumerate(prompts):
            ids.append(f"{request_id}-{i}")
            if log is not None:
                log.log(ids[-1], prompt_ids, params[i] if isinstance(params, list) else params, lora_request)
            streams.append(engine.add_request(ids[-1], prompt_ids, params[i] if isinstance(params, list) else params,
                                              output_kind=kind, cache_salt=cache_salt,
                                              lora_request=lora_request, priority=priority))
    except BaseException:
        abort_all(engine, ids)
        raise
    return streams, ids


def abort_all(engine: AsyncLLM, request_ids: list[str]):
    for request_id in request_ids:
        engine.abort(request_id)


async def merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from several streams, as they come."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream):
        try:
            async for out in stream:
                q.put_nowait((i, out))
        except Exception as e:
            q.put_nowait((i, e))
        q.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await q.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def final_outputs(streams: list[AsyncIterator[RequestOutput]], param: str | None = None) -> list[RequestOutput]:
    """The finished output of each stream. param: the field a 400 from the engine names (client_error)."""
    async def last(stream):
        out = None
        async for out in stream:
            pass
        return out
    try:
        return list(await asyncio.gather(*(last(s) for s in streams)))
    except EngineGenerateError as e:
        raise client_error(e, param) from e


def client_error(e: EngineGenerateError, param: str | None) -> Exception:
    """The engine's failure of a request the client caused (status 400: a constraint that did not compile, or
    not within the time limit; an adapter that could not be read) as a 400 naming the field that set it; any
    other stays a 500."""
    if e.status == 400 and "LoRA adapter" in str(e):   # lora/loader.py's errors name the adapter so
        return APIError(400, str(e), "model", "invalid_lora_adapter")
    if e.status == 400:
        return APIError(400, str(e), param or "structured_outputs", "invalid_structured_output")
    return e


async def open_stream(raw_request: Request, engine: AsyncLLM, request_ids: list[str],
                      outputs: AsyncIterator[RequestOutput], param: str | None) -> AsyncIterator | Response:
    """outputs with its first item awaited before a streamed response sends its status line: a request the
    engine fails before any output (a constraint that does not compile) is still an HTTP error. A client that
    leaves meanwhile gets 499 and its requests are aborted."""
    async def first():
        try:
            return await _peek(outputs)
        except EngineGenerateError as e:
            abort_all(engine, request_ids)
            raise client_error(e, param) from e
        except BaseException:
            abort_all(engine, request_ids)
            raise
    return await until_disconnect(raw_request, first())


async def _peek(items: AsyncIterator) -> AsyncIterator:
    try:
        head = [await anext(items)]
    except StopAsyncIteration:
        head = []
    return _Pushback(head, items)


class _Pushback:
    """items with `head` in front. __anext__ hands out the items' own awaitable, so the stream has no extra
    generator layer per item."""
    __slots__ = ("head", "items")

    def __init__(self, head: list, items: AsyncIterator):
        self.head, self.items = head, items

    def __aiter__(self):
        return self

    def __anext__(self):
        if self.head:
            return _ready(self.head.pop())
        return self.items.__anext__()


async def _ready(item):
    return item


class SSEResponse(StreamingResponse):
    """A streamed response of server-sent events (str chunks), with what every one shares around its chunks:
    an error after the status line went out is reported in the stream, the engine requests are aborted
    however the stream ends, then [DONE]. StreamingResponse's own loop with that folded in: one frame per
    chunk instead of a generator around the chunks (this runs for every stream at every step)."""

    end = DONE   # the stream's last event (OpenAI's)

    def __init__(self, engine: AsyncLLM, request_ids: list[str], chunks: AsyncIterator[str],
                 param: str | None = None):
        super().__init__(chunks, media_type="text/event-stream")
        self.engine, self.request_ids = engine, request_ids
        self.param = param   # the field a request the engine fails as the client's doing names (client_error)

    def error_event(self, e: Exception) -> str:
        """The error a non-streamed request would answer, in the stream: a 400 the engine found mid-way (a
        constraint's end before min_tokens) names its field as such; anything else is a server error."""
        if isinstance(e, EngineGenerateError):
            e = client_error(e, self.param)
        if isinstance(e, APIError):
            return sse(error_body(e.status, e.message, e.param, e.code))
        return sse(error_body(500, str(e)))

    async def stream_response(self, send):
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        chunks = self.body_iterator.__aiter__()
        try:
            while True:
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    break
                except Exception as e:   # the chunks' error, not send's (a closed connection)
                    chunk = self.error_event(e)
                    await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
                    break
                await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
        finally:
            abort_all(self.engine, self.request_ids)
        if self.end:
            await send({"type": "http.response.body", "body": self.end.encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


_to_json = json.JSONEncoder(separators=(",", ":")).encode   # json.dumps(obj, separators=...), one encoder


def sse(obj: dict) -> str:
    return f"data: {_to_json(obj)}\n\n"


def sse_event(name: str, obj: dict) -> str:
    """sse(obj) under an event name, as Anthropic's and the Responses API's streams send each event."""
    return f"event: {name}\n{sse(obj)}"


# Streamed chunks are {**head, "choices": [choice]} with a head fixed per response and a choice of a fixed
# shape. Encoding them with sse() costs ~6 us a chunk, more than all the rest of a chunk's Python work
# besides detokenizing; completions.py and chat.py instead encode the head once (sse_prefix) and write the
# choice by hand (json_str, json_value). The bytes are sse()'s: tests/server/test_chunk_json.py holds them
# to it.

def sse_prefix(head: dict) -> str:
    """sse({**head, "choices": [choice]}) == sse_prefix(head) + <choice's JSON> + "]}\n\n"."""
    return f'data: {_to_json(head)[:-1]},"choices":['


json_str = encode_basestring_ascii   # a str as json.dumps writes it (ASCII, escaped)


def json_value(value) -> str:
    """Any value as json.dumps writes it; str and None without the encoder's per-call setup."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return encode_basestring_ascii(value)
    return _to_json(value)


def usage(num_prompt_tokens: int, num_completion_tokens: int, details: tuple[int, int | None] | None = None,
          created: int | None = None) -> dict:
    """details: (prompt tokens read from the prefix cache, completion tokens of reasoning or None: no such
    field), as OpenAI's prompt_tokens_details and completion_tokens_details say them. created: vLLM's
    prompt_tokens_details.created_cache_tokens (chat's; None: no such field)."""
    out = {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_completion_tokens,
           "total_tokens": num_prompt_tokens + num_completion_tokens}
    if details is not None:
        out["prompt_tokens_details"] = {"cached_tokens": details[0]}
        if created is not None:
            out["prompt_tokens_details"]["created_cache_tokens"] = created
        if details[1] is not None:
            out["completion_tokens_details"] = {"reasoning_tokens": details[1]}
    return out


def answer_usage(fields: dict) -> dict:
    """A non-streamed answer's usage with every key of vLLM's UsageInfo dumped whole (its streams leave the nulls
    out): prompt_tokens_details null without details, and within them created_cache_tokens (completions have
    none) and multimodal_tokens (a text model's: none) null when unset."""
    details = fields.get("prompt_tokens_details")
    if details is not None:
        details = {"cached_tokens": details["cached_tokens"],
                   "created_cache_tokens": details.get("created_cache_tokens"), "multimodal_tokens": None}
    return {**fields, "prompt_tokens_details": details}


def cached_details(ctx: "ServingContext", num_cached: int) -> tuple[int, None] | None:
    """usage()'s details under --enable-prompt-tokens-details: the cached prompt tokens, 0 too (vLLM 0.26's rule:
    its outputs' num_cached_tokens is never None)."""
    return (num_cached, None) if ctx.enable_prompt_tokens_details else None


def created_cache_tokens(ctx: "ServingContext", num_prompt_tokens: int, num_cached: int) -> int:
    """vLLM 0.26's created_cache_tokens (chat's usage under --enable-prompt-tokens-details): the prompt tokens its
    prefill wrote into the prefix cache, the prompt's full blocks less those it found there (its scheduler's
    estimate_cached_tokens at the first output, less num_cached_tokens); 0 with prefix caching off."""
    processor = ctx.engine.input_processor
    if not processor.enable_prefix_caching:
        return 0
    return max(0, num_prompt_tokens // processor.block_size * processor.block_size - num_cached)


async def until_disconnect(raw_request: Request, work: Awaitable):
    """Runs a non-streaming handler's work, cancelling it when the client goes away (streaming responses
    get this from Starlette). The work's own finally then aborts its engine requests."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(raw_request))
    try:
        await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            # cancel() only asks: the task is cancelled once it has run its finally (aborts), so wait for it.
            # Reading task.cancelled() before that gives False, and task.result() raises InvalidStateError.
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return Response(status_code=499)   # nobody is listening
    return task.result()


async def _wait_disconnect(raw_request: Request):
    while (await raw_request.receive())["type"] != "http.disconnect":
        pass
