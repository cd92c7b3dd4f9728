"""The request body where it enters, before any route sees it: bounded in size and in nesting, and free of lone
surrogates.

A lone surrogate (the JSON escape \\ud800 without its pair) parses into a Python str that no UTF-8 codec,
tokenizer or JSON response can encode; refused here, it cannot reach any place that takes text. JSON can
carry one only as such an escape (raw UTF-8 bytes cannot encode a surrogate), so a body without the escape
costs one regex scan in C; one with it (often an emoji's valid pair, as `json.dumps` writes it) is parsed
once more to find the field.
"""
import asyncio
import json
import re
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pagedllm.server.errors import MISSING_KEY, shaped_error, shorten

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class _TooLarge(Exception):
    pass


class _Disconnected(Exception):
    pass


BODY_TIMEOUT_SECONDS = 60.0   # for the whole body to arrive: one that never finishes (slowloris) is a 408
# Levels of arrays and objects a body may nest. A request's values are passed on by code that recurses per level
# (pickled to the engine core, schema walkers, xgrammar, jinja's tojson): a schema nested ~700 levels killed the
# thread that sends requests to the core, and every later request hung. Real schemas and tool inputs nest a few
# dozen levels at most.
MAX_JSON_DEPTH = 128


class RequestBodyGuard:
    """Pure ASGI middleware: reads the whole body (413 past max_bytes, before reading it when the
    Content-Length says so), refuses lone surrogates (400 naming the field; 404 in `model`), then replays the
    body to the app; later receive() calls (disconnect watching) go to the server as before."""

    def __init__(self, app: ASGIApp, max_bytes: int, authorized: Callable[[Scope], bool] | None = None,
                 timeout: float = BODY_TIMEOUT_SECONDS):
        """authorized(scope): False for a request to a keyed route without the API key, refused from its
        headers alone, before the server buffers up to max_bytes of its body (None: no key); timeout: seconds
        for the whole body to arrive."""
        self.app, self.max_bytes, self.authorized, self.timeout = app, max_bytes, authorized, timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.authorized is not None and not self.authorized(scope):
            # Connection: close: the body is never read, so it must not be taken for the next request.
            response = shaped_error(scope["path"], 401, MISSING_KEY, None, "invalid_api_key",
                                    headers={"Connection": "close"})
            return await response(scope, receive, send)
        try:
            body = await asyncio.wait_for(_read_body(scope, receive, self.max_bytes), self.timeout)
        except _Disconnected:
            return
        except asyncio.TimeoutError:   # TimeoutError itself from Python 3.11
            response = shaped_error(scope["path"], 408, f"the request body did not arrive within {self.timeout:g} s",
                                    None, "request_timeout", headers={"Connection": "close"})
            return await response(scope, receive, send)
        except _TooLarge:
            message = (f"the request body is larger than this server's limit of {self.max_bytes} bytes "
                       f"(--max-request-body-bytes)")
            # Connection: close: the unread rest of the body must not be taken for the next request.
            response = shaped_error(scope["path"], 413, message, None, "request_too_large",
                                    headers={"Connection": "close"})
            return await response(scope, receive, send)
        if _nested_deeper_than(body, MAX_JSON_DEPTH):
            return await _too_deep_response(scope["path"], body)(scope, receive, send)
        if _SURROGATE_ESCAPE.search(body) and (path := _lone_surrogate_path(body)) is not None:
            return await _surrogate_response(scope["path"], path)(scope, receive, send)
        await self.app(scope, _replay(body, receive), send)


async def _read_body(scope: Scope, receive: Receive, max_bytes: int) -> bytes:
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > max_bytes:
            raise _TooLarge
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise _TooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}
    return replay


def _lone_surrogate_path(body: bytes) -> list[str] | None:
    """The path (keys, list indices) of the first string or key holding a lone surrogate, or None. A body
    that does not parse is left to the route, which answers it."""
    try:
        stack = [((), json.loads(body))]
    except (ValueError, RecursionError):
        return None
    while stack:   # iterative: the JSON may be nested as deep as the parser allows
        path, value = stack.pop()
        if isinstance(value, str) and not _encodes(value):
            return list(path)
        if isinstance(value, dict):
            for key, item in value.items():
                if not _encodes(key):
                    return [*path, key]
                stack.append(((*path, key), item))
        elif isinstance(value, list):
            stack.extend(((*path, str(i)), item) for i, item in enumerate(value))
    return None


_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_INNERMOST = re.compile(rb"\[\]|\{\}")


def _nested_deeper_than(body: bytes, limit: int) -> bool:
    """Whether the JSON body nests more than `limit` arrays and objects, by bytes operations in C: ~1 ms a MB for
    a body with few brackets (most), ~10 ms a MB for one with many (long chats with tools). Strings are cut out
    first (escaped backslashes and quotes removed, then every other piece between quotes), so that their
    brackets neither count nor hide depth; then innermost pairs are removed, once a level."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    unescaped = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    brackets = b"".join(unescaped.split(b'"')[::2]).translate(None, _NOT_BRACKETS)
    for _ in range(limit):
        shorter = _INNERMOST.sub(b"", brackets)   # one pass: "{[]}" loses its "[]" now, its "{}" next time
        if not shorter or shorter == brackets:   # shallow enough, or not JSON (the route answers that)
            return False
        brackets = shorter
    return True


def _too_deep_response(route: str, body: bytes):
    """The 400, naming the top-level field that nests too deeply where the body parses (it may not, nested
    past the parser's own depth)."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        value = None
    # the body's object is a level itself: a value `MAX_JSON_DEPTH` deep in it is one past the limit
    key = next((k for k, v in value.items() if _depth(v) >= MAX_JSON_DEPTH), None) if isinstance(value, dict) \
        else None
    param = None if key is None else shorten(key)   # a client's key, echoed
    return shaped_error(route, 400, f"{param or 'the body'} is nested too deeply: arrays and objects more than "
                                    f"{MAX_JSON_DEPTH} levels deep (this server's limit)", param, "invalid_json")


def _depth(value) -> int:
    """Levels of arrays and objects in a parsed value (iterative: it may be as deep as the parser allows)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            stack.extend((inner, level + 1) for inner in (item.values() if isinstance(item, dict) else item))
    return deepest


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _surrogate_response(route: str, path: list[str]):
    param = ".".join(path) or None
    if path == ["model"]:   # no served model has such a name
        return shaped_error(route, 404, "The model does not exist: its name holds a lone UTF-16 surrogate.",
                            "model", "model_not_found")
    return shaped_error(route, 400, f"{param or 'the body'} holds a lone UTF-16 surrogate (a \\ud800-\\udfff "
                                    f"escape without its pair), which is not text", param, "invalid_value")
