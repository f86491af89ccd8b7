"""What every route needs from the request: its body validated into a schema, its sparsity spec parsed,
the engine client, and the server-sent-events framing."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from glassbox.layers.sparsity import SparsityError, SparsityMethod, parse_sparsity
from glassbox.server.engine_client import EngineClient
from glassbox.server.errors import APIError, api_error_of

M = TypeVar("M", bound=BaseModel)

SSE_DONE = "data: [DONE]\n\n"


class _NonFinite(str):
    """NaN / Infinity / -Infinity, which Python's json reads though JSON has no such numbers: kept as a
    marker so the walk can name the field it is in."""


def check_json(data: Any, max_depth: int) -> None:
    """Walk a parsed body without recursion: nesting deeper than `max_depth` and strings that cannot be
    UTF-8 (a lone surrogate such as "\\ud800", which JSON escapes allow) are 400s naming where they are."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, _NonFinite):
            field = path or "body"
            raise APIError(400, f"{field}: {value} is not a JSON number (numbers must be finite)", field)
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError as error:
                    field = path or "body"
                    raise APIError(400, f"{field}: not valid Unicode (a lone surrogate at character {error.start})", field) from None
        elif isinstance(value, (dict, list)):
            if depth >= max_depth:
                raise APIError(400, f"max_json_depth: the body nests deeper than {max_depth} levels", "max_json_depth")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str) and not key.isascii():
                    stack.append((key, path or "body", depth))
                stack.append((item, f"{path}.{key}" if path and isinstance(key, str) else f"{path}[{key}]" if path else str(key), depth + 1))


def error_field(loc: tuple[Any, ...]) -> str:
    """A pydantic error location as the field's path ("messages[0].content"), without the union
    members' type tags ("str", "list[int]") pydantic puts in it."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part.isidentifier() and part not in TYPE_TAGS:
            path += f".{part}" if path else part
    return path or "body"


TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "bytes", "none", "function", "literal"}


def parse_body(raw: bytes, model: type[M], max_depth: int) -> M:
    """A body's bytes, validated into `model`; APIError (400) naming the first bad field otherwise."""
    try:
        data = json.loads(raw or b"null", parse_constant=_NonFinite)
    except RecursionError:
        raise APIError(400, f"max_json_depth: the body nests deeper than {max_depth} levels", "max_json_depth") from None
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
        raise APIError(400, f"body: not valid JSON: {error}", "body") from None
    if not isinstance(data, dict):
        raise APIError(400, "body: the request body must be a JSON object", "body")
    check_json(data, max_depth)
    try:
        return model.model_validate(data)
    except ValidationError as error:
        errors = error.errors()
        # Of a union's failed members, the one that got furthest says best what is wrong ([false]: item 0).
        first = max((e for e in errors if e["loc"][:1] == errors[0]["loc"][:1]), key=lambda e: len(e["loc"]))
        field = error_field(first["loc"])
        raise APIError(400, f"{field}: {first['msg']}", field) from None


def json_body(model: type[M]) -> Callable[[Request], Awaitable[M]]:
    """A dependency that reads the body as JSON (guard.py decides which Content-Types may carry it and
    bounds its size while reading) and validates it, naming the first bad field and the reason. The
    model is kept on the dependency, so the OpenAPI schema can describe the body (server/openapi.py)."""

    async def parse(request: Request) -> M:
        limits = request.app.state.settings.limits
        raw = await request.body()
        if len(raw) > limits.max_body_bytes:  # a body that reached the app without the guard
            raise APIError(413, f"max_body_bytes: the request body is over {limits.max_body_bytes} bytes", "max_body_bytes")
        return parse_body(raw, model, limits.max_json_depth)

    parse.body_model = model  # type: ignore[attr-defined]
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
    except Exception as error:  # a plugin method's own parse() that raised: the plugin's fault, not ours
        raise APIError(422, f"{field}: the sparsity method's parse() raised {type(error).__name__}: {error}", field, "plugin_error") from None


def sse(data: object) -> str:
    """One server-sent event carrying `data` as JSON."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def with_error_event(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """A stream's events; if it fails after the 200 went out, one last event carries the error (the same
    object as an error response's, vLLM's way) and `[DONE]` follows: a stream never just stops."""
    try:
        async for event in events:
            yield event
    except Exception as error:  # a client gone is a CancelledError, not caught: nobody to tell
        api = api_error_of(error)
        yield sse({"error": {"message": api.message, "type": api.kind, "param": api.param, "code": api.status}})
        yield SSE_DONE
