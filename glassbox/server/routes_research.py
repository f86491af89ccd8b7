"""Engine introspection: /cache/stats, /cache/clear, /debug/memory_usage. Each runs on the engine's loop
thread between two steps, so what it reads is one consistent state."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from glassbox.research.cache import cache_stats, clear_prefix_cache
from glassbox.research.memory import memory_usage

router = APIRouter()


@router.get("/cache/stats")
async def get_cache_stats(request: Request) -> dict[str, Any]:
    return await request.app.state.engine.call(cache_stats)


@router.post("/cache/clear")
async def post_cache_clear(request: Request) -> dict[str, Any]:
    """Drops unreferenced cached prefix blocks; blocks of running requests are kept."""
    return await request.app.state.engine.call(clear_prefix_cache)


@router.get("/debug/memory_usage")
async def get_memory_usage(request: Request) -> dict[str, Any]:
    return await request.app.state.engine.call(memory_usage)
