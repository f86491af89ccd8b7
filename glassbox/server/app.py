"""The FastAPI application: one process, the async engine on `app.state`, thin routes.

    app = create_app(AsyncLLMEngine(LLMEngine(load_model(None))), ServerSettings())
"""

from __future__ import annotations

import hmac
import json
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from glassbox import __version__
from glassbox.engine.async_engine import AsyncLLMEngine, EngineDeadError
from glassbox.engine.llm_engine import LLMEngine
from glassbox.layers.sparsity import SparsityError, SparsityMethod, parse_sparsity
from glassbox.research.handles import HandleStore
from glassbox.research.latency import LatencyStats
from glassbox.research.plugins import PluginManager, Registry
from glassbox.research.profiler import Profiler
from glassbox.server.metrics import Metrics

M = TypeVar("M", bound=BaseModel)
logger = logging.getLogger(__name__)

PUBLIC_PATHS = {"/health"}


@dataclass
class ServerSettings:
    model_name: str = "SmolLM2-135M-Instruct"
    api_key: str | None = None
    max_body_bytes: int = 4 << 20  # 4 MiB of JSON is far more than any prompt the context can hold
    ready_message: str | None = None  # printed once the engine runs (the CLI's one line)
    plugin: Path | None = None  # algorithm plugin file (command line only), reloaded when it changes


class APIError(Exception):
    """A client error to report as one JSON error object, naming the field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


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


def plugin_registry(request: Request) -> Registry:
    """What the --plugin file registered (an empty registry without one)."""
    manager = request.app.state.plugins
    return manager.registry if manager is not None else Registry()


def sparsity_of(request: Request, spec: dict[str, Any] | None, field: str = "sparsity") -> SparsityMethod | None:
    """A request's sparsity spec -> a method (built in or from the plugin file); 400 naming the field."""
    if spec is None:
        return None
    try:
        return parse_sparsity(spec, plugin_registry(request).sparsity_methods, field)
    except SparsityError as error:
        raise APIError(400, str(error), error.field) from None


class GuardMiddleware:
    """API key (every path but /health) and body size, before any route runs.

    A plain ASGI middleware: Starlette's BaseHTTPMiddleware reports a disconnect to the app as soon as
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


def _start_plugins(engine: AsyncLLMEngine, path: Path) -> PluginManager:
    """Load the plugin file and watch it. On each good reload, a serving policy or global sparsity mask
    that came from the plugin is replaced by its new version (on the loop thread, between steps)."""

    def refresh(registry: Registry) -> None:
        def swap(llm_engine: LLMEngine) -> None:
            current = llm_engine.scheduler.policy.name
            if current in registry.policies:
                llm_engine.scheduler.policy = registry.policies[current]()
            mask = llm_engine.default_sparsity
            if mask is not None and mask.name in registry.sparsity_methods:
                try:
                    llm_engine.default_sparsity = parse_sparsity(mask.spec(), registry.sparsity_methods)
                except Exception:  # the new version rejects the old parameters: the global mask is dropped
                    logger.exception("plugin reload: the global sparsity mask %s no longer parses; cleared", mask.spec())
                    llm_engine.default_sparsity = None

        engine.submit(swap)

    manager = PluginManager(path, on_reload=refresh)
    manager.load()
    return manager.watch()


def create_app(engine: AsyncLLMEngine, settings: ServerSettings | None = None) -> FastAPI:
    from glassbox.server import routes_generate, routes_openai, routes_ops, routes_research, routes_sparsity

    settings = settings or ServerSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not engine.is_alive and engine.error is None:
            engine.start()
        if settings.ready_message:
            print(settings.ready_message, file=sys.stderr, flush=True)
        yield
        if app.state.plugins is not None:
            app.state.plugins.stop()
        engine.shutdown()

    app = FastAPI(title="glassbox", version=__version__, lifespan=lifespan)
    app.state.engine = engine
    app.state.settings = settings
    app.state.metrics = Metrics(engine)
    app.state.profiler = Profiler()
    app.state.latency = LatencyStats()
    app.state.handles = HandleStore()
    app.state.plugins = _start_plugins(engine, settings.plugin) if settings.plugin else None
    engine.add_finish_listener(app.state.latency.observe_request)
    engine.add_finish_listener(app.state.metrics.observe)
    app.add_middleware(GuardMiddleware, settings=settings)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return error_response(error.status, error.message, error.param, error.kind)

    @app.exception_handler(ValueError)
    async def value_error(request: Request, error: ValueError) -> JSONResponse:
        # The engine's own validation (context length, token ids, ...): the message names the field.
        return error_response(400, str(error), None)

    @app.exception_handler(EngineDeadError)
    async def engine_dead(request: Request, error: EngineDeadError) -> JSONResponse:
        return error_response(503, str(error), None, "engine_dead")

    app.include_router(routes_generate.router)
    app.include_router(routes_openai.router)
    app.include_router(routes_ops.router)
    app.include_router(routes_research.router)
    app.include_router(routes_sparsity.router)
    return app
