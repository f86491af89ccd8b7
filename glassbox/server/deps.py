"""What every route needs from the request: its body validated into a schema, its sparsity spec parsed,
the engine client, and the server-sent-events framing."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from glassbox.layers.sparsity import SparsityError, SparsityMethod, parse_sparsity
from glassbox.server.engine_client import EngineClient
from glassbox.server.errors import APIError

M = TypeVar("M", bound=BaseModel)

SSE_DONE = "data: [DONE]\n\n"


def json_body(model: type[M]) -> Callable[[Request], Awaitable[M]]:
    """A dependency that reads the body as JSON whatever its Content-Type (the design's curl examples
    send JSON as form data) and validates it, naming the first bad field and the reason."""

    async def parse(request: Request) -> M:
        raw = await request.body()
        limit = request.app.state.settings.max_body_bytes
        if len(raw) > limit:  # a chunked body sends no Content-Length for the middleware to check
            raise APIError(413, f"request body over {limit} bytes", "body")
        try:
            data = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise APIError(400, f"the request body is not valid JSON: {error}", "body") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object", "body")
        try:
            return model.model_validate(data)
        except ValidationError as error:
            first = error.errors()[0]
            field = ".".join(str(part) for part in first["loc"]) or "body"
            raise APIError(400, f"{field}: {first['msg']}", field) from None

    return parse


def engine_client(request: Request) -> EngineClient:
    """The app's engine client (a dependency)."""
    return request.app.state.client


def sparsity_of(spec: dict[str, Any] | None, field: str = "sparsity") -> SparsityMethod | None:
    """A request's sparsity spec -> a method (built in or the plugin's, from the one registry); 400 naming
    the field."""
    if spec is None:
        return None
    try:
        return parse_sparsity(spec, prefix=field)
    except SparsityError as error:
        raise APIError(400, str(error), error.field) from None


def sse(data: object) -> str:
    """One server-sent event carrying `data` as JSON."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
