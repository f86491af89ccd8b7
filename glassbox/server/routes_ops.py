"""Operations: /metrics (Prometheus text format) and /version."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from glassbox import __version__
from glassbox.server.deps import engine_client
from glassbox.server.engine_client import EngineClient

router = APIRouter()


@router.get("/metrics")
async def metrics(request: Request, client: EngineClient = Depends(engine_client)) -> Response:
    stats = await client.stats()
    return Response(request.app.state.metrics.render(stats), media_type=CONTENT_TYPE_LATEST)


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": __version__}
