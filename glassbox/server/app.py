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
from fastapi.middleware.cors import CORSMiddleware

from glassbox import __version__
from glassbox.engine.async_engine import AsyncLLMEngine
from glassbox.research.handles import HandleStore
from glassbox.research.latency import LatencyStats
from glassbox.research.plugins import PluginEntries, PluginManager, fall_back_to_builtins, follow_new_version
from glassbox.research.profiler import Profiler
from glassbox.server.background import Background
from glassbox.server.mode_header import ModeHeaderMiddleware
from glassbox.server import routes_generate, routes_openai, routes_ops, routes_research, routes_sparsity
from glassbox.server.engine_client import EngineClient
from glassbox.server.errors import add_error_handlers
from glassbox.server.guard import GuardMiddleware
from glassbox.server.metrics import Metrics
from glassbox.server.openapi import describe_request_bodies
from glassbox.server.settings import ServerSettings
from glassbox.server.shutdown import BACKSTOP_S, DrainOnSignal, exit_when_engine_dies

ROUTERS = (routes_generate, routes_openai, routes_ops, routes_research, routes_sparsity)


def create_app(
    engine: AsyncLLMEngine, settings: ServerSettings | None = None, plugins: PluginManager | None = None
) -> FastAPI:
    """`engine` is started here if it was not. `plugins`: the --plugin file, already loaded (so the engine's
    scheduling policy may be one of its policies); it is watched from now on, and on each good reload a
    serving policy or global sparsity mask that came from it follows its new version."""
    settings = settings or ServerSettings()
    limits = settings.limits
    if not engine.is_alive and engine.error is None:
        engine.start()
    client = EngineClient(engine, settings.model_name, limits)
    drain_on_signal = DrainOnSignal(client, settings.shutdown_timeout_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        drain_on_signal.install()
        if settings.ready_message:
            print(settings.ready_message, file=sys.stderr, flush=True)
        yield
        drain_on_signal.uninstall()
        if plugins is not None:
            plugins.stop()
        engine.shutdown()
        app.state.background.close()
        app.state.profiler.close()

    app = FastAPI(title="glassbox", version=__version__, lifespan=lifespan)
    app.state.client = client
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.profiler = Profiler(limits)
    app.state.background = Background()
    app.state.latency = LatencyStats()
    app.state.handles = HandleStore(limits.max_handles, limits.handle_ttl_s, limits.max_handle_bytes)
    app.state.plugins = plugins
    app.state.schedule_runs = 0  # /optimization/batch_schedule runs in progress
    engine.add_finish_listener(app.state.latency.observe_request)
    engine.add_finish_listener(app.state.metrics.observe)
    if settings.exit_on_engine_death:
        engine.add_death_listener(exit_when_engine_dies())
    if plugins is not None:

        def follow(entries: PluginEntries) -> None:  # on the plugin's watcher thread
            engine.submit(lambda llm_engine: follow_new_version(llm_engine, entries))

        def fall_back(unloaded: PluginEntries) -> None:  # on the engine's loop thread, where the fault was reported
            fall_back_to_builtins(engine.engine, unloaded)

        plugins.add_listener(follow)
        plugins.add_unload_listener(fall_back)
        plugins.watch()
    app.add_middleware(ModeHeaderMiddleware, batch_invariant=client.facts.model_info["batch_invariant"])
    app.add_middleware(GuardMiddleware, settings=settings)
    if settings.cors_origins:  # outside the guard: it answers the browser's preflight for these origins only
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"], allow_headers=["*"])
    add_error_handlers(app)
    for routes in ROUTERS:
        app.include_router(routes.router)
    describe_request_bodies(app, [routes.router for routes in ROUTERS])
    return app


def uvicorn_shutdown_timeout(settings: ServerSettings) -> float:
    """uvicorn's own graceful-shutdown limit: the drain's, plus a margin for the failed requests to close."""
    return settings.shutdown_timeout_s + BACKSTOP_S

