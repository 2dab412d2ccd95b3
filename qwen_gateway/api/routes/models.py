"""``GET /models`` and ``GET /models/{id}`` (OpenAI list shape, the configured ids)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from qwen_gateway.api.deps import KeyedRoute, get_gateway
from qwen_gateway.api.render import compat

router = APIRouter(route_class=KeyedRoute)


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    gateway = get_gateway(request)
    return compat.model_list_body(
        [
            compat.model_body(model_id=m.id, created=gateway.started_at, owned_by=m.spec.owned_by)
            for m in gateway.models
        ]
    )


@router.get("/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    gateway = get_gateway(request)
    served = gateway.models.get(model_id)
    return compat.model_body(model_id=served.id, created=gateway.started_at, owned_by=served.spec.owned_by)
