"""``GET /health``: each model's state, active generations and queue depth (no key needed).

It never waits on an engine's work: under overload it still answers at once."""

from __future__ import annotations

from fastapi import APIRouter, Request

from qwen_gateway.api.deps import get_gateway
from qwen_gateway.api.responses import JSONBytesResponse
from qwen_gateway.engines.base import EngineState

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONBytesResponse:
    statuses = await get_gateway(request).models.statuses()
    ready = all(s.health.state is EngineState.READY for s in statuses)
    body = {
        "status": "ok" if ready else "degraded",
        "models": [
            {
                "id": s.id,
                "engine": s.engine,
                "state": s.health.state.value,
                "active_generations": s.health.active_generations,
                "queued": s.queued,
                "queue_limit": s.queue_limit,
                **({"detail": s.health.detail} if s.health.detail else {}),
            }
            for s in statuses
        ],
    }
    return JSONBytesResponse(body, status_code=200 if ready else 503)
