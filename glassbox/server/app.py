"""The FastAPI application: one process, one engine client on `app.state`, thin routes.

    app = create_app(AsyncLLMEngine(LLMEngine(load_model(None))), ServerSettings())

Imports point one way: app → routes_* → deps → engine_client / errors / schemas. No route imports another
route or this module.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from glassbox import __version__
from glassbox.engine.async_engine import AsyncLLMEngine
from glassbox.research.handles import HandleStore
from glassbox.research.latency import LatencyStats
from glassbox.research.plugins import PluginEntries, PluginManager, follow_new_version
from glassbox.research.profiler import Profiler
from glassbox.server import routes_generate, routes_openai, routes_ops, routes_research, routes_sparsity
from glassbox.server.engine_client import EngineClient
from glassbox.server.errors import add_error_handlers
from glassbox.server.guard import GuardMiddleware
from glassbox.server.metrics import Metrics
from glassbox.server.settings import ServerSettings

ROUTERS = (routes_generate, routes_openai, routes_ops, routes_research, routes_sparsity)


def create_app(
    engine: AsyncLLMEngine, settings: ServerSettings | None = None, plugins: PluginManager | None = None
) -> FastAPI:
    """`engine` is started here if it was not. `plugins`: the --plugin file, already loaded (so the engine's
    scheduling policy may be one of its policies); it is watched from now on, and on each good reload a
    serving policy or global sparsity mask that came from it follows its new version."""
    settings = settings or ServerSettings()
    if not engine.is_alive and engine.error is None:
        engine.start()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.ready_message:
            print(settings.ready_message, file=sys.stderr, flush=True)
        yield
        if plugins is not None:
            plugins.stop()
        engine.shutdown()

    app = FastAPI(title="glassbox", version=__version__, lifespan=lifespan)
    app.state.client = EngineClient(engine, settings.model_name)
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.profiler = Profiler()
    app.state.latency = LatencyStats()
    app.state.handles = HandleStore()
    app.state.plugins = plugins
    engine.add_finish_listener(app.state.latency.observe_request)
    engine.add_finish_listener(app.state.metrics.observe)
    if plugins is not None:

        def follow(entries: PluginEntries) -> None:  # on the plugin's watcher thread
            engine.submit(lambda llm_engine: follow_new_version(llm_engine, entries))

        plugins.add_listener(follow)
        plugins.watch()
    app.add_middleware(GuardMiddleware, settings=settings)
    add_error_handlers(app)
    for routes in ROUTERS:
        app.include_router(routes.router)
    return app

