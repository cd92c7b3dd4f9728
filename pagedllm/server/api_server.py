"""`pagedllm serve`: the OpenAI-compatible HTTP server (FastAPI + uvicorn) over AsyncLLM.

Faults: when the engine core process dies, the requests in flight fail and the server exits with code 1 (a
supervisor restarts it, as vLLM's does); a stopped or hung core makes /health 503 (AsyncLLM's heartbeat). A
SIGINT or SIGTERM stops it cleanly: requests in flight finish (or end with an error after STOP_GRACE_SECONDS),
the core is shut down, exit code 0.
"""
import gc
import logging
import os
import secrets
import signal
import sys
import time
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers

import pagedllm
from pagedllm.config import EngineConfig, ServerConfig
from pagedllm.engine.async_llm import AsyncLLM, EngineDeadError
from pagedllm.engine.core_process import freeze_gc
from pagedllm.server.anthropic import CountTokensRequest, MessagesRequest, count_tokens, create_message
from pagedllm.server.chat import create_chat_completion, render_chat
from pagedllm.server.chat_batch import BatchChatCompletionRequest, create_chat_batch
from pagedllm.server.completions import create_completion
from pagedllm.server.errors import MISSING_KEY, APIError, error_response, install_error_handlers
from pagedllm.server.generative_scoring import GenerativeScoringRequest, create_generative_scoring
from pagedllm.server.launch import LoRAModulePath, ServeChecks
from pagedllm.server.lora import ServingLoRAs, lora_routes, model_card
from pagedllm.server.metrics import HttpMetrics, ServerMetrics
from pagedllm.server.pause_routes import dev_mode, pause_routes
from pagedllm.server.profile_routes import profile_routes
from pagedllm.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
                                     validated)
from pagedllm.server.response_store import ResponseStore
from pagedllm.server.responses import cancel_response, create_response, retrieve_response, stored_response
from pagedllm.server.responses_request import ResponsesRequest
from pagedllm.server.request_body import RequestBodyGuard
from pagedllm.server.request_id_header import RequestIdHeader
from pagedllm.server.request_logger import RequestLogger
from pagedllm.server.serving import ServingContext, system_fingerprint

logger = logging.getLogger("pagedllm")
API_KEY_ENV = "PAGEDLLM_API_KEY"
VLLM_API_KEY_ENV = "VLLM_API_KEY"
STOP_GRACE_SECONDS = 5   # after a stop signal, for the requests in flight to finish
# Young-generation size of the garbage collector (CPython's default: 700 allocations). A stream allocates a few
# containers per token event (outputs, chunks, frames) and its request holds prompt-sized lists that each
# collection of an older generation walks: with 300 streams the default ran ~40 young collections and ~10
# middle ones a second (1-17 ms each) and full ones of up to 170 ms, ~20% of the API process's CPU; at 20,000
# a young collection comes every few seconds (benchmarks/api_cost.py --fake-core, traced with benchmarks/trace).
API_GC_THRESHOLD = 20_000


def build_app(ctx: ServingContext, metrics: ServerMetrics, config: ServerConfig, api_keys: list[str],
              lora_modules: list[LoRAModulePath] = (), profiling: bool = False) -> FastAPI:
    """api_keys: any of them opens a keyed route (resolved_api_keys); []: no key. profiling: --profiler-config
    set a profiler, so /start_profile and /stop_profile are served."""
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        ctx.engine.attach()   # watch the core from the start, not from the first request
        try:
            if ctx.loras is not None:
                await ctx.loras.load_static(lora_modules)
        except ValueError as e:   # a bad --lora-modules adapter: the server does not start
            logger.error("%s", e)
            ctx.startup_error = str(e)
            ctx.engine.shutdown()
            raise
        yield
        ctx.tokenizer_pool.shutdown(wait=False, cancel_futures=True)
        ctx.engine.shutdown()

    docs = {"docs_url": None, "redoc_url": None, "openapi_url": None} if config.disable_fastapi_docs else {}
    app = FastAPI(title="pagedllm", version=pagedllm.__version__, lifespan=lifespan, root_path=config.root_path or "",
                  **docs)
    install_error_handlers(app)
    _add_middleware(app, config, _authorized(api_keys))
    # outermost: the guard's and CORS' refusals count too, as vLLM's instrumentator counts them
    if metrics is not None:
        app.add_middleware(HttpMetrics, metrics=metrics, routes_of=lambda: app.openapi()["paths"])
    # The key guards every route that runs the model or the tokenizer; /health, /version, /metrics stay open.
    keyed = [Depends(_api_key_check(api_keys))]
    v1 = APIRouter(prefix="/v1", dependencies=keyed)

    @v1.post("/completions")
    async def completions(req: CompletionRequest, raw_request: Request):
        return await create_completion(ctx, req, raw_request)

    @v1.post("/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw_request: Request):
        return await create_chat_completion(ctx, req, raw_request)

    @v1.post("/chat/completions/batch")
    async def chat_completions_batch(req: BatchChatCompletionRequest, raw_request: Request):
        return await create_chat_batch(ctx, req, raw_request)

    @v1.post("/responses")
    async def responses(req: ResponsesRequest, raw_request: Request):
        return await create_response(ctx, req, raw_request)

    @v1.get("/responses/{response_id}")
    async def retrieve(response_id: str, raw_request: Request, stream: bool = False, starting_after: int | None = None,
                       include_obfuscation: bool | None = None):   # only a stream's deltas carry it: a no-op
        for name, unset in (("stream", not stream), ("starting_after", starting_after is None)):
            if not unset:   # starting_after: the event of a streamed retrieval to resume after
                raise APIError(400, "a stored response is retrieved whole: there are no background responses to "
                               "stream here", name, "unsupported_parameter")
        query = raw_request.query_params   # the openai SDK writes include as include[]
        return retrieve_response(ctx, response_id, query.getlist("include") + query.getlist("include[]"))

    @v1.post("/responses/{response_id}/cancel")
    async def cancel(response_id: str):
        return await cancel_response(ctx, response_id)

    @v1.delete("/responses/{response_id}")
    async def delete_response(response_id: str):
        stored_response(ctx, response_id)
        if response_id in ctx.responses.running:   # a background response at work stops first
            await cancel_response(ctx, response_id)
        ctx.responses.delete(response_id)
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    @v1.post("/messages")
    async def messages(req: MessagesRequest, raw_request: Request):
        return await create_message(ctx, req, raw_request)

    @v1.post("/messages/count_tokens")
    async def messages_count_tokens(req: CountTokensRequest):
        return await count_tokens(ctx, req)

    @v1.get("/models")
    async def models():
        cards = [model_card(name, ctx.engine.config.model, None, ctx.engine.max_model_len)
                 for name in (ctx.model_name, *ctx.model_aliases)]
        return {"object": "list", "data": [*cards, *(ctx.loras.cards() if ctx.loras is not None else [])]}

    app.include_router(v1)

    @app.post("/generative_scoring", dependencies=keyed)
    async def generative_scoring(req: GenerativeScoringRequest, raw_request: Request):
        return await create_generative_scoring(ctx, req, raw_request)

    @app.post("/invocations", dependencies=keyed)
    async def invocations(raw_request: Request):
        """SageMaker's one route (vLLM's): a body with messages is a chat completion, one with a prompt a
        completion; SageMaker's adapter header, when sent, is the body's model."""
        try:
            body = await raw_request.json()
        except ValueError as e:
            raise APIError(400, f"the body is not valid JSON: {e}", None, "invalid_json") from e
        kind = next((k for k in ("messages", "prompt") if isinstance(body, dict) and k in body), None)
        adapter = raw_request.headers.get(SAGEMAKER_ADAPTER_HEADER)
        if kind is not None and adapter:   # vLLM's (SageMaker's inject_adapter_id): the header names the model
            body["model"] = adapter
        if kind is None:
            raise APIError(400, "/invocations takes a chat completion (with messages) or a completion (with "
                                "prompt)", None, "invalid_value")
        req = validated(ChatCompletionRequest if kind == "messages" else CompletionRequest, body)
        return await (create_chat_completion if kind == "messages" else create_completion)(ctx, req, raw_request)
    app.include_router(lora_routes(ctx.loras, keyed))
    app.include_router(_tokenizer_routes(ctx, keyed, config.enable_tokenizer_info_endpoint))
    if dev_mode():
        app.include_router(pause_routes(ctx.engine, keyed))
    if profiling:   # vLLM's: served only with a profiler configured
        logger.warning("a profiler is enabled: /start_profile and /stop_profile are served (for local development "
                       "only, as vLLM says)")
        app.include_router(profile_routes(ctx.engine, keyed))

    @app.get("/health")
    @app.get("/ping")    # SageMaker's name for it (vLLM's), GET or POST
    @app.post("/ping")
    async def health():
        reason = ctx.engine.unhealthy_reason()
        if reason is not None:
            return error_response(503, reason, None, "engine_dead" if ctx.engine.dead else "engine_unresponsive")
        return Response(status_code=200)

    @app.get("/load")
    async def server_load():
        # vLLM's: its count of requests in flight with --enable-server-load-tracking, else always 0 (its default);
        # that flag is refused here (vllm_flags.py), so 0 is vLLM's answer. /metrics has the running and waiting
        # requests.
        return {"server_load": 0}

    @app.get("/version")
    async def version():
        return {"version": pagedllm.__version__}

    @app.get("/metrics")
    @app.get("/metrics/", include_in_schema=False)   # vLLM's mount answers it too (no 307 to /metrics)
    async def prometheus_metrics():
        # Served whatever the core's state: the API process's own metrics (latencies, finished requests) always,
        # the core's counts when it answers (none, rather than stale ones, while /health is 503).
        try:
            stats = await ctx.engine.get_stats()
        except EngineDeadError:
            stats = None
        body = metrics.render(stats)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def _tokenizer_routes(ctx: ServingContext, dependencies: list, tokenizer_info: bool = False) -> APIRouter:
    """/tokenize and /detokenize: the tokenizer runs on its thread (a long text takes seconds); /tokenizer_info
    with --enable-tokenizer-info-endpoint (vLLM's: without it the route does not exist, a 404)."""
    router = APIRouter(dependencies=dependencies)

    if tokenizer_info:
        @router.get("/tokenizer_info")
        async def get_tokenizer_info():
            return JSONResponse(tokenizer_config(ctx.tokenizer, ctx.chat_template))

    @router.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        await ctx.resolve_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", "prompt", "invalid_value")
        ids = (await ctx.encode(req.prompt, req.add_special_tokens) if req.prompt is not None else
               (await render_chat(ctx, req))[1])
        # JSONResponse: json.dumps in C; FastAPI's encoding of a returned dict walks the ids in Python (0.6 s
        # on the loop for 500k ids)
        # vLLM's: the vocabulary's strings (convert_ids_to_tokens), not decoded text; the key is always there,
        # null unless asked (vLLM's TokenizeResponse dumps its None)
        strs = await ctx.off_loop(ctx.tokenizer.convert_ids_to_tokens, ids) if req.return_token_strs else None
        answer = {"count": len(ids), "max_model_len": ctx.engine.max_model_len, "tokens": ids, "token_strs": strs}
        return JSONResponse(answer)

    @router.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        await ctx.resolve_model(req.model)
        vocab = len(ctx.tokenizer)
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"tokens must be in [0, {vocab}), got {bad[:5]}", "tokens", "invalid_value")
        return {"prompt": await ctx.off_loop(ctx.tokenizer.decode, req.tokens)}
    return router


def tokenizer_config(tokenizer, chat_template: str | None) -> dict:
    """vLLM's /tokenizer_info: the tokenizer's init kwargs (tokenizer_config.json's keys) less the vocab and
    merges file paths, special tokens (AddedToken) as their text, tokenizer_class, and the --chat-template's
    text when one was given. tokenizer_class is the tokenizer's own class (vLLM's name has its cache
    wrapper's "Cached" prefix, which no tokenizer loads by)."""
    def plain(value):
        if hasattr(value, "content"):
            return value.content
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value
    config = {k: v for k, v in (getattr(tokenizer, "init_kwargs", None) or {}).items()
              if k not in ("vocab_file", "merges_file")}
    config = plain(config)
    config["tokenizer_class"] = type(tokenizer).__name__
    if chat_template:
        config["chat_template"] = chat_template
    return config


def _add_middleware(app: FastAPI, config: ServerConfig, authorized=None):
    """Outermost last: CORS wraps the body guard, so that its 413 and 400 reach browsers too. authorized: the
    key check on the headers, which the guard makes before it reads a keyed route's body."""
    app.add_middleware(RequestBodyGuard, max_bytes=config.max_request_body_bytes, authorized=authorized)
    if config.enable_request_id_headers:   # outside the guard: its 413s and 400s carry the id too
        app.add_middleware(RequestIdHeader)
    if config.allowed_origins:
        app.add_middleware(_CORSMiddleware, allow_origins=config.allowed_origins,
                           allow_methods=config.allowed_methods, allow_headers=config.allowed_headers,
                           allow_credentials=config.allow_credentials)


class _CORSMiddleware(CORSMiddleware):
    """Starlette's, with a refused preflight (its plain-text 400) in OpenAI's error shape."""

    def preflight_response(self, request_headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code == 200:
            return response
        headers = {k: v for k, v in response.headers.items() if k not in ("content-length", "content-type")}
        return error_response(response.status_code, f"CORS preflight refused: {response.body.decode()}", None,
                              "cors_refused", headers=headers)


def _key_matches(expected: list[bytes], authorization: str, x_api_key: str) -> bool:
    # Header values arrive decoded as latin-1 (Starlette's): encoded back, they are the bytes the client sent, which
    # for a non-ASCII key are its UTF-8 (as `expected` is); .encode() would encode it twice.
    scheme, _, param = authorization.encode("latin-1").partition(b" ")
    given = b"Bearer " + param if scheme.lower() == b"bearer" else b""   # the scheme in any case, as vLLM's
    other = b"Bearer " + x_api_key.encode("latin-1")
    # constant time: no key prefix leaks by timing (every key compared, both headers, whichever was sent)
    found = False
    for key in expected:
        found |= secrets.compare_digest(given, key) | secrets.compare_digest(other, key)
    return found


# SageMaker's LoRA header: on /invocations, the adapter (a served model name) that answers, as vLLM's
SAGEMAKER_ADAPTER_HEADER = "X-Amzn-SageMaker-Adapter-Identifier"

# The routes outside /v1/ that build_app guards with the key (`dependencies=keyed`)
_KEYED_PATHS = ("/tokenize", "/detokenize", "/tokenizer_info", "/invocations", "/generative_scoring")


def _authorized(api_keys: list[str]):
    """RequestBodyGuard's check, before the body is read: False for a keyed route (all of /v1/, _KEYED_PATHS;
    the path less the app's root_path, as the router reads it) without a key. None: no key."""
    if not api_keys:
        return None
    expected = [f"Bearer {key}".encode() for key in api_keys]

    def authorized(scope) -> bool:
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root) and path[len(root):len(root) + 1] in ("", "/"):
            path = path[len(root):]
        if not (path.startswith("/v1/") or path in _KEYED_PATHS):
            return True
        headers = Headers(scope=scope)
        return _key_matches(expected, headers.get("authorization", ""), headers.get("x-api-key", ""))
    return authorized


def _api_key_check(api_keys: list[str]):
    """Authorization: Bearer <key>, or Anthropic's x-api-key: <key>; any of the keys."""
    expected = [f"Bearer {key}".encode() for key in api_keys] or None

    async def check(request: Request):
        if expected is None:
            return
        if not _key_matches(expected, request.headers.get("authorization", ""), request.headers.get("x-api-key", "")):
            raise APIError(401, MISSING_KEY, None, "invalid_api_key")
    return check


def run_api_server(engine_config: EngineConfig, server_config: ServerConfig, checks: ServeChecks, core,
                   sock=None, index: int = 0, shared_waiting=None):
    """One API process: the app over an AsyncLLM, until a stop signal or the core's death. checks: what
    launch.serve read before any process started; core: this process's client of the core process (launch.py
    starts it first). With several (api_servers.py): `sock` the port they all listen on, `index` which one it
    is (the first logs what they would all log), `shared_waiting` their waiting count."""
    import uvicorn

    class Server(uvicorn.Server):
        core_died = False

        def handle_exit(self, sig, frame):   # a stop signal: the core's exit that follows is no fault
            if not engine.closing and engine.loop is not None:
                # Requests in flight get STOP_GRACE_SECONDS to finish, then end with an error (before
                # uvicorn's own timeout would cancel them with an error line).
                engine.loop.call_soon_threadsafe(engine.loop.call_later, STOP_GRACE_SECONDS,
                                                 engine.fail_in_flight, "the server is shutting down")
            engine.closing = True
            super().handle_exit(sig, frame)

        def on_core_death(self):
            self.core_died = self.should_exit = True

    app, ctx = serving_app(engine_config, server_config, checks, core, lambda: server.on_core_death(),
                           shared_waiting)
    engine, api_keys = ctx.engine, resolved_api_keys(server_config)
    if index == 0:
        scheme = "https" if server_config.ssl_certfile else "http"
        count = server_config.api_server_count
        logger.info("serving %s at %s://%s:%d%s (API key %s%s%s)", ctx.model_name, scheme, server_config.host,
                    server_config.port, server_config.root_path or "", "required" if api_keys else "off",
                    f"; {count} API processes" if count > 1 else "",
                    f"; started in {time.monotonic() - checks.started:.1f} s")
    freeze_gc()
    gc.set_threshold(API_GC_THRESHOLD, 10, 10)
    server = Server(uvicorn_config(app, server_config))
    _run(server, ctx, sock)


def uvicorn_config(app, config: ServerConfig):
    import uvicorn
    return uvicorn.Config(app, host=config.host, port=config.port,
                          log_level=config.uvicorn_log_level or config.log_level,
                          access_log=not config.disable_uvicorn_access_log, timeout_keep_alive=30,
                          timeout_graceful_shutdown=STOP_GRACE_SECONDS + 5, ssl_keyfile=config.ssl_keyfile,
                          ssl_certfile=config.ssl_certfile)


def serving_app(engine_config: EngineConfig, server_config: ServerConfig, checks: ServeChecks, core, on_dead,
                shared_waiting=None) -> tuple[FastAPI, ServingContext]:
    """The app and its context over an AsyncLLM on the core: what an API process serves, and what `pagedllm
    run-batch` sends its requests to in process. on_dead: called when the core dies."""
    names = server_config.served_model_name
    names = [names] if isinstance(names, str) else list(names or [engine_config.model])
    # metrics' token buckets need the engine's max_model_len: built right after it, before any step (late-bound)
    engine = AsyncLLM(engine_config, server_config.max_waiting_queue_length,
                      on_step_stats=lambda step: metrics.record(step),
                      heartbeat_timeout=server_config.engine_heartbeat_timeout,
                      step_timeout=server_config.engine_step_timeout,
                      on_dead=on_dead,
                      core=core, shared_waiting=shared_waiting)
    metrics = ServerMetrics(names[0], engine_config, engine.max_model_len)
    ctx = ServingContext(engine, names[0], checks.chat_template, model_aliases=names[1:],
                         trust_request_chat_template=server_config.trust_request_chat_template,
                         return_tokens_as_token_ids=server_config.return_tokens_as_token_ids,
                         tool_call_parser=server_config.tool_call_parser,
                         reasoning_parser=server_config.reasoning_parser,
                         enable_auto_tool_choice=server_config.enable_auto_tool_choice,
                         response_role=server_config.response_role,
                         default_chat_template_kwargs=server_config.default_chat_template_kwargs,
                         chat_template_content_format=server_config.chat_template_content_format,
                         exclude_tools_when_tool_choice_none=server_config.exclude_tools_when_tool_choice_none,
                         enable_prompt_tokens_details=server_config.enable_prompt_tokens_details,
                         enable_force_include_usage=server_config.enable_force_include_usage,
                         enable_per_request_metrics=server_config.enable_per_request_metrics,
                         system_fingerprint=system_fingerprint(engine_config, server_config.fingerprint_mode,
                                                               server_config.fingerprint_value),
                         responses=ResponseStore(server_config.responses_store) if server_config.responses_store
                         else None,
                         request_logger=RequestLogger(engine.tokenizer, server_config.max_log_len)
                         if server_config.enable_log_requests else None)
    if engine_config.enable_lora:
        ctx.loras = ServingLoRAs(engine, ctx.model_name, ctx.model_aliases)
    app = build_app(ctx, metrics, server_config, resolved_api_keys(server_config), checks.lora_modules,
                    profiling=engine_config.profiler_config.enabled)
    return app, ctx


def resolved_api_keys(config: ServerConfig) -> list[str]:
    """--api-key (one or several), else PAGEDLLM_API_KEY, else vLLM's VLLM_API_KEY (a vLLM deployment's
    environment keeps its server keyed, not open); []: no key."""
    env = os.environ.get(API_KEY_ENV) or os.environ.get(VLLM_API_KEY_ENV)
    return list(config.api_key) or ([env] if env else [])


def startup_traceback_filter(ctx: ServingContext):
    """A start-up error of ours (logged with its message: a bad --lora-modules adapter) reaches uvicorn as an
    exception out of the lifespan, which uvicorn logs again as a traceback: this drops that record."""
    return lambda record: ctx.startup_error is None or not record.getMessage().startswith("Traceback")


def _run(server, ctx: ServingContext, sock=None):
    """uvicorn raises a stop signal again once it has shut down, to the handlers found at start: these ones
    make that a no-op, so a stop ends with exit code 0 and no KeyboardInterrupt traceback. A dead engine core
    ends the process with code 1."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    logging.getLogger("uvicorn.error").addFilter(startup_traceback_filter(ctx))
    try:
        server.run(sockets=None if sock is None else [sock])
    except SystemExit:   # uvicorn's when the app's start-up failed (code 3)
        if ctx.startup_error is None:
            raise
    if ctx.startup_error is not None:
        logger.error("exiting with code 1: the server could not start: %s", ctx.startup_error)
        sys.exit(1)
    if server.core_died:
        logger.error("exiting with code 1: the engine core process died")
        sys.exit(1)
