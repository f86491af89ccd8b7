"""One JSON shape for every error the API returns (vLLM's ErrorResponse):
{"error": {"message", "type", "param", "code"}}, the message naming the field or limit at fault, and
`param` naming it too whenever one is.

Whose fault decides the status: the caller's input 4xx (400 a field, 413/429 a budget), a plugin's
algorithm that raised 422, a request cut by shutdown 503, a dead engine 503, and only our own faults 500.
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from glassbox.engine.async_engine import EngineDeadError, RequestFailedError
from glassbox.engine.llm_engine import RequestError
from glassbox.errors import FieldError
from glassbox.research.limits import LimitError

logger = logging.getLogger(__name__)

# "field: reason" — how the engine's and the instruments' ValueErrors name the field they are about
FIELD_PREFIX = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")

FAULT_STATUS = {"plugin": (422, "plugin_error"), "shutdown": (503, "unavailable_error"), "internal": (500, "internal_error")}


class APIError(Exception):
    """A client error to report as one JSON error object, naming the field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


def field_of(message: str) -> str | None:
    """The field a "field: reason" message names."""
    match = FIELD_PREFIX.match(message)
    return match.group(1) if match else None


def request_error_body(error: RequestError) -> dict:
    """A failed request's error object (also the payload of a stream's error event)."""
    status, kind = FAULT_STATUS.get(error.fault, (500, "internal_error"))
    return {"message": error.message, "type": kind, "param": error.param, "code": status}


def api_error_of(error: BaseException) -> APIError:
    """The API error an exception raised while serving a request stands for (a stream's error event)."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, RequestFailedError):
        body = request_error_body(error.error)
        return APIError(body["code"], body["message"], body["param"], body["type"])
    if isinstance(error, LimitError):
        return APIError(error.status, str(error), error.limit)
    if isinstance(error, FieldError):
        return APIError(400, str(error), error.field)
    if isinstance(error, EngineDeadError):
        return APIError(503, str(error), None, "engine_dead")
    if isinstance(error, ValueError):  # the engine's and instruments' own checks: "field: reason"
        return APIError(400, str(error), field_of(str(error)))
    logger.error("request failed", exc_info=error)
    return APIError(500, f"internal error: {type(error).__name__}: {error}", None, "internal_error")


def add_error_handlers(app: FastAPI) -> None:
    def answer(error: BaseException) -> JSONResponse:
        api = api_error_of(error)
        return error_response(api.status, api.message, api.param, api.kind)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return answer(error)

    @app.exception_handler(ValueError)
    async def value_error(request: Request, error: ValueError) -> JSONResponse:
        return answer(error)

    @app.exception_handler(RequestFailedError)
    async def request_failed(request: Request, error: RequestFailedError) -> JSONResponse:
        return answer(error)

    @app.exception_handler(EngineDeadError)
    async def engine_dead(request: Request, error: EngineDeadError) -> JSONResponse:
        return answer(error)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        # Path and query parameters (bodies are validated by deps.json_body).
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"][1:]) or str(first["loc"][0])
        return error_response(400, f"{field}: {first['msg']}", field)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        return answer(error)
