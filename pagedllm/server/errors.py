"""Errors in the OpenAI shape: {"error": {"message", "type", "param", "code"}}, with the HTTP status (Anthropic's
shape on Anthropic's routes).

Every failure a client can cause ends here as a response; none reaches the engine core. Every error response,
whatever raised it (our checks, pydantic, Starlette's 404/405, a body that does not parse, a bug), has this
shape: no handler leaves FastAPI's {"detail": ...} or a plain-text body.
"""
import json
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from pagedllm.engine.async_llm import EngineDeadError, EngineGenerateError, QueueFullError

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          500: "server_error", 503: "server_overloaded"}
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
RETRY_AFTER_SECONDS = 1


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class ErrorResponse(JSONResponse):
    """JSON in ASCII: a message or param that quotes a client's lone surrogate (\\ud800) still encodes,
    where JSONResponse's UTF-8 encoding would fail and turn the error into a 500."""
    def render(self, content) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode()


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> ErrorResponse:
    return ErrorResponse(error_body(status, message, param, code), status_code=status, headers=headers)


# Anthropic's routes (anthropic.py) answer errors in Anthropic's shape: {"type": "error", "error": {"type",
# "message"}}, the field named in the message.
ANTHROPIC_ROUTES = ("/v1/messages", "/v1/messages/count_tokens")
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                    503: "overloaded_error"}


def _shaped(request: Request, status: int, message: str, param: str | None = None, code: str | None = None,
            headers: dict | None = None) -> ErrorResponse:
    return shaped_error(request.url.path, status, message, param, code, headers)


def shaped_error(path: str, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None) -> ErrorResponse:
    """error_response, or Anthropic's shape on Anthropic's routes."""
    if not path.endswith(ANTHROPIC_ROUTES):
        return error_response(status, message, param, code, headers)
    return ErrorResponse(anthropic_error_body(status, message, param), status_code=status, headers=headers)


def anthropic_error_body(status: int, message: str, param: str | None = None) -> dict:
    if param and not message.startswith(param):
        message = f"{param}: {message}"
    return {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(status, "api_error"), "message": message}}


MAX_ECHO_CHARS = 200   # of a value echoed in an error message
MISSING_KEY = "invalid or missing API key (Authorization: Bearer ..., or x-api-key)"


def shorten(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """A value echoed in an error, cut short: a 5 MB stop string must not make a 5 MB response."""
    return text if len(text) <= limit else text[:limit] + "..."


def bad_value(e: ValueError) -> APIError:
    """A ValueError from SamplingParams or the engine: its message already names the field and the limit
    ("SamplingParams.<field> must be <limit>, got <value>"); the value is cut short."""
    message = str(e)
    match = re.match(r"SamplingParams\.(\w+)", message)
    param = match.group(1) if match else next((f for f in ("prompt", "priority") if message.startswith(f)), None)
    head, got, value = message.partition(", got ")
    return APIError(400, shorten(head, 1000) + got + shorten(value), param, code="invalid_value")


def install_error_handlers(app: FastAPI):
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return _shaped(request, e.status, e.message, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        if first.get("type") == "json_invalid":
            return _shaped(request, 400, f"the body is not valid JSON: {first.get('ctx', {}).get('error')}",
                           None, "invalid_json")
        if len(first.get("loc", ())) <= 1 and first.get("type") in ("dict_type", "model_type",
                                                                  "model_attributes_type", "missing"):
            what = "is empty" if first.get("type") == "missing" else "is not a JSON object"
            return _shaped(request, 400, f"the body {what}: send one, with Content-Type: application/json",
                           None, "invalid_value")
        path, msg = _union_error(e.errors())
        param = shorten(".".join(path)) or None   # a path may hold a client's (unknown) key
        message = f"{param}: {msg}" if param else msg
        return _shaped(request, 400, message, param, "invalid_value")

    @app.exception_handler(ValueError)
    async def _value_error(request: Request, e: ValueError):
        err = bad_value(e)
        return _shaped(request, err.status, err.message, err.param, err.code)

    @app.exception_handler(QueueFullError)
    async def _queue_full(request: Request, e: QueueFullError):
        return _shaped(request, 503, f"server busy, retry later: {e}", code="queue_full",
                       headers={"Retry-After": str(RETRY_AFTER_SECONDS)})

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(request: Request, e: EngineDeadError):
        return _shaped(request, 500, str(e), code="engine_dead")

    @app.exception_handler(EngineGenerateError)
    async def _engine_generate(request: Request, e: EngineGenerateError):   # this request only: the server lives on
        if e.status == 400:   # the request's own fault; serving.client_error names the field it came from
            from pagedllm.server.serving import client_error
            err = client_error(e, None)
            return _shaped(request, 400, err.message, err.param, err.code)
        return _shaped(request, 500, str(e), code="engine_error")

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException):
        """Starlette's and FastAPI's own: unknown route, wrong method, a body that does not parse."""
        code = _HTTP_CODES.get(e.status_code, "invalid_json" if e.status_code == 400 else None)
        path = request.scope.get("path", "")
        path = path.removeprefix(request.scope.get("root_path", "")) or path
        message = _http_error_message(e)
        if e.status_code == 404 and path in VLLM_DEV_ROUTES:
            message = f"{path} is a development route: {VLLM_DEV_ROUTES[path]}"
        elif e.status_code == 404 and path in VLLM_ROUTES_NOT_BUILT:
            message = f"{path} is vLLM's, not built here: {VLLM_ROUTES_NOT_BUILT[path]}"
        return _shaped(request, e.status_code, message, None, code, headers=e.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        # A bug, not the client's fault: a generic message (no internals); Starlette re-raises the exception
        # after this response, and uvicorn logs it with its traceback.
        return _shaped(request, 500, "internal server error", None, "internal_error")


# A union's branch in a pydantic error's loc: ('prompt', 'list[int]', 0) is prompt's list-of-ids branch.
_BRANCH = re.compile(r"[a-z][\w-]*\[.*\]|str|int|float|bool|dict|list|none|[A-Z]\w*")
_JSON_TYPES = {"str": "a string", "int": "an integer", "float": "a number", "bool": "a boolean", "dict": "an object",
               "list": "an array", "NoneType": "null"}


def _union_error(errors: list[dict]) -> tuple[list[str], str]:
    """The field path (without union branch names) and the message of a validation failure. A field of several
    accepted forms fails once per form: the error of the form that got furthest into the value names the real
    problem (a content part's unknown key); when none got past the field itself, the message lists the forms
    (pydantic's first alone says "prompt.str: Input should be a valid string")."""
    def split(err: dict) -> tuple[list[str], list[str]]:
        loc = [p for p in err.get("loc", ()) if p != "body"]
        path, branches = [], []
        for i, p in enumerate(loc):
            key = i == len(loc) - 1 and err.get("type") == "extra_forbidden"   # the client's key, never a branch
            (branches if isinstance(p, str) and _BRANCH.fullmatch(p) and not key else path).append(str(p))
        return path, branches
    def message(err: dict) -> str:   # a validator's own words, without pydantic's "Value error, " in front
        return str(err.get("msg")).removeprefix("Value error, ")
    splits = [split(e) for e in errors]
    field, branches = splits[0]
    if not branches:
        return field, message(errors[0])
    union = [(e, path, forms) for e, (path, forms) in zip(errors, splits) if path[:len(field)] == field]
    deepest, path, _ = max(union, key=lambda u: len(u[1]))
    if len(path) > len(field):
        return path, message(deepest)
    forms = dict.fromkeys(forms[-1] for _, _, forms in union if forms)
    value = type(errors[0].get("input")).__name__
    return field, f"must be {' or '.join(forms)}; got {_JSON_TYPES.get(value, value)}"


_DEV = "vLLM serves it with VLLM_SERVER_DEV_MODE=1 only; "
# vLLM's development routes built here, served with VLLM_SERVER_DEV_MODE=1 (server/pause_routes.py) -> a 404's words
VLLM_DEV_ROUTES = dict.fromkeys(("/sleep", "/wake_up", "/is_sleeping", "/pause", "/resume", "/is_paused"),
                                "served (as by vLLM) with VLLM_SERVER_DEV_MODE=1 only: pausing the scheduler, "
                                "sleep level 0")
VLLM_DEV_ROUTES.update(dict.fromkeys(("/start_profile", "/stop_profile"), "served (as by vLLM) only with "
                                     "--profiler-config, e.g. '--profiler-config.profiler=torch "
                                     "--profiler-config.torch_profiler_dir=DIR'"))
_WEIGHTS = "weight transfer (weights updated in place, for RL training) is not built: start a server on the " \
           "updated checkpoint"
# vLLM 0.26's routes that pagedllm does not serve -> why, and what instead: a 404 that names it (not "no such route")
VLLM_ROUTES_NOT_BUILT = {
    "/server_info": _DEV + "vLLM's config objects are not built here: /v1/models has the model and its "
                           "max_model_len, /version the version",
    "/reset_prefix_cache": _DEV + "resetting the prefix cache from the API is not built here (LLM."
                                  "reset_prefix_cache() offline); restart the server to empty it",
    "/reset_mm_cache": _DEV + "no multimodal model is built here, so there is no such cache",
    "/reset_encoder_cache": _DEV + "no encoder model is built here, so there is no such cache",
    "/collective_rpc": _DEV + "calls on every worker are not built here",
    "/abort_requests": _DEV + "aborting requests from outside is not built: a client that closes its connection "
                              "aborts its request",
    "/get_world_size": _DEV + "the world size is --tensor-parallel-size",
    **dict.fromkeys(("/init_weight_transfer_engine", "/start_weight_update", "/start_draft_weight_update",
                     "/update_weights", "/finish_weight_update"), _DEV + _WEIGHTS),
    "/scale_elastic_ep": "elastic expert parallelism is not built: no mixture-of-experts model is built here",
    "/is_scaling_elastic_ep": "elastic expert parallelism is not built: no mixture-of-experts model is built here",
}


def _http_error_message(e: HTTPException) -> str:
    """FastAPI says only "There was an error parsing the body": its cause says which error."""
    cause = e.__cause__
    if isinstance(cause, UnicodeDecodeError):
        return f"the body is not valid UTF-8 (byte {cause.start})"
    if isinstance(cause, RecursionError):
        return "the body's JSON is nested too deeply"
    if e.status_code == 404:
        return "no such route (the API is under /v1: /v1/completions, /v1/chat/completions, /v1/models)"
    if e.status_code == 405:
        return f"this route takes only {(e.headers or {}).get('Allow', 'other methods')}"
    return str(e.detail)
