"""What is checked before any route runs: the Host header, the browser Origin, the API key, the
Content-Type, and the body's size — counted while it is read, so a chunked body without Content-Length
is cut off at the limit instead of read whole.

Without an API key a web page the user visits must not be able to drive the local server:
- Host must be one of the allowed hosts (`--allowed-hosts`; by default the bound address and, for a
  loopback bind, its loopback names): a DNS-rebound name is refused (400).
- A request carrying an Origin header (every browser sends one on a cross-origin POST) must come from the
  page's own origin or a `--cors-origin` (403); there is no CORS unless `--cors-origin` is given.
- A body must be `application/json`. The design's bare `curl -d '{...}'` sends
  `application/x-www-form-urlencoded` (or nothing): such a body is read as JSON only when the request
  has no Origin header, i.e. it does not come from a browser page; anything else is 415.
With an API key the key is required instead (a browser cannot attach it cross-origin without CORS); Host
and Origin are checked all the same.
"""

from __future__ import annotations

import hmac
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from glassbox.server.errors import error_response
from glassbox.server.settings import ServerSettings

PUBLIC_PATHS = {"/health"}
BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
CURL_TYPES = {"", "application/x-www-form-urlencoded"}  # what `curl -d` and bare clients send


def host_name(host_header: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1', '[::1]:8000' -> '::1', 'Example.com' -> 'example.com'."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


class GuardMiddleware:
    """A plain ASGI middleware: Starlette's BaseHTTPMiddleware reports a disconnect to the app as soon as
    the response starts, which would cancel every stream."""

    def __init__(self, app: ASGIApp, settings: ServerSettings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        refusal = self.refusal(scope, headers)
        if refusal is not None:
            status, message, param, kind = refusal
            await error_response(status, message, param, kind)(scope, receive, send)
            return
        if scope["method"] in BODY_METHODS:
            body = await self.read_body(receive)
            if body is None:
                return  # the client left while sending
            if isinstance(body, int):
                limit = self.settings.max_body_bytes
                await error_response(413, f"max_body_bytes: the request body is over {limit} bytes", "max_body_bytes")(scope, receive, send)
                return
            receive = replay(body, receive)
        await self.app(scope, receive, send)

    def refusal(self, scope: Scope, headers: dict[str, str]) -> tuple[int, str, str | None, str] | None:
        """(status, message, param, type) of the first check the request fails, or None."""
        settings = self.settings
        allowed = settings.allowed_hosts
        host = headers.get("host", "")
        if allowed is not None and host_name(host) not in allowed:
            message = f"Host: {host!r} is not served here; allowed: {', '.join(allowed)} (--allowed-hosts)"
            return 400, message, "Host", "invalid_request_error"
        origin = headers.get("origin")
        if origin is not None and origin not in settings.cors_origins and urlsplit(origin).netloc.lower() != host.lower():
            message = f"Origin: {origin!r} may not call this server; allow it with --cors-origin"
            return 403, message, "Origin", "permission_error"
        key = settings.api_key
        if key and scope["path"] not in PUBLIC_PATHS:
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                return 401, "missing or wrong API key: send 'Authorization: Bearer KEY'", None, "authentication_error"
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > settings.max_body_bytes:
            return 413, f"max_body_bytes: the request body is over {settings.max_body_bytes} bytes", "max_body_bytes", "invalid_request_error"
        has_body = (length.isdigit() and int(length) > 0) or "chunked" in headers.get("transfer-encoding", "")
        if not key and scope["method"] in BODY_METHODS and has_body:
            kind = media_type(headers.get("content-type", ""))
            json_like = kind == "application/json" or kind.endswith("+json")
            if not json_like and not (kind in CURL_TYPES and origin is None):
                message = f"Content-Type: send application/json, not {kind or 'none'!r}"
                return 415, message, "Content-Type", "invalid_request_error"
        return None

    async def read_body(self, receive: Receive) -> bytes | int | None:
        """The whole body, or its size once over the limit (reading stops there), or None on disconnect."""
        limit = self.settings.max_body_bytes
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return size
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the body read already, then whatever the client sends next (a disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
