"""API key (every path but /health) and body size, checked before any route runs."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from glassbox.server.errors import error_response
from glassbox.server.settings import ServerSettings

PUBLIC_PATHS = {"/health"}


class GuardMiddleware:
    """A plain ASGI middleware: Starlette's BaseHTTPMiddleware reports a disconnect to the app as soon as
    the response starts, which would cancel every stream."""

    def __init__(self, app: ASGIApp, settings: ServerSettings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = {name.decode().lower(): value.decode(errors="replace") for name, value in scope["headers"]}
            key = self.settings.api_key
            if key and scope["path"] not in PUBLIC_PATHS:
                given = headers.get("authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                    message = "missing or wrong API key: send 'Authorization: Bearer KEY'"
                    await error_response(401, message, None, "authentication_error")(scope, receive, send)
                    return
            length = headers.get("content-length", "")
            if length.isdigit() and int(length) > self.settings.max_body_bytes:
                await error_response(413, f"request body over {self.settings.max_body_bytes} bytes", "body")(scope, receive, send)
                return
        await self.app(scope, receive, send)
