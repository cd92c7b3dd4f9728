"""vLLM's --enable-request-id-headers: every response carries X-Request-Id, the request's own (a gateway's trace
id) or a new one, so that a client can name the request in a report. Pure ASGI: a streamed body passes untouched."""
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class RequestIdHeader:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id")
        request_id = given or uuid.uuid4().hex.encode()

        async def send_with_id(message: Message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id)]
            await send(message)
        await self.app(scope, receive, send_with_id)
