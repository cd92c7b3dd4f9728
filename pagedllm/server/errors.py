"""Errors in the OpenAI shape: {"error": {"message", "type", "param", "code"}}, with the HTTP status.

Every failure a client can cause ends here as a response; none reaches the engine core.
"""
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from pagedllm.engine.async_llm import EngineDeadError, EngineGenerateError, QueueFullError

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          500: "server_error", 503: "server_overloaded"}
RETRY_AFTER_SECONDS = 1


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def bad_value(e: ValueError) -> APIError:
    """A ValueError from SamplingParams or the engine: its message already names the field and the limit."""
    match = re.match(r"SamplingParams\.(\w+)", str(e))
    return APIError(400, str(e), param=match.group(1) if match else None, code="invalid_value")


def install_error_handlers(app: FastAPI):
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return error_response(e.status, e.message, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError):
        first = e.errors()[0]
        if first.get("type") == "json_invalid":
            return error_response(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error')}",
                                  None, "invalid_json")
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return error_response(400, message, param, "invalid_value")

    @app.exception_handler(ValueError)
    async def _value_error(_: Request, e: ValueError):
        err = bad_value(e)
        return error_response(err.status, err.message, err.param, err.code)

    @app.exception_handler(QueueFullError)
    async def _queue_full(_: Request, e: QueueFullError):
        return error_response(503, f"server busy, retry later: {e}", code="queue_full",
                              headers={"Retry-After": str(RETRY_AFTER_SECONDS)})

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(_: Request, e: EngineDeadError):
        return error_response(500, str(e), code="engine_dead")

    @app.exception_handler(EngineGenerateError)
    async def _engine_generate(_: Request, e: EngineGenerateError):   # this request only: the server lives on
        return error_response(500, str(e), code="engine_error")
