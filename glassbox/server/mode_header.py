"""Every response says which numerics produced it: `X-Glassbox-Batch-Invariant: true` when the server runs
the batch-invariant mode (`--batch-invariant`: a request's numbers do not depend on its batch), `false`
otherwise — research endpoints' figures included, without a field in each of their bodies.

A plain ASGI middleware (as server/guard.py is): Starlette's BaseHTTPMiddleware would report a disconnect to
the app as soon as a streamed response starts."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-glassbox-batch-invariant"


class ModeHeaderMiddleware:
    def __init__(self, app: ASGIApp, batch_invariant: bool) -> None:
        self.app = app
        self.value = b"true" if batch_invariant else b"false"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_mode(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (HEADER, self.value)]
            await send(message)

        await self.app(scope, receive, send_with_mode)
