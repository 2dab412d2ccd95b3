"""``GET /health``: each model's state and its number of active generations (no key needed)."""

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
                **({"detail": s.health.detail} if s.health.detail else {}),
            }
            for s in statuses
        ],
    }
    return JSONBytesResponse(body, status_code=200 if ready else 503)
