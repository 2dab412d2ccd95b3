"""``GET /metrics``: the gateway's Prometheus metrics (no key needed, like /health; nothing in them
names a key)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from qwen_gateway.api.deps import get_gateway
from qwen_gateway.service.metrics import CONTENT_TYPE

router = APIRouter()


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(get_gateway(request).metrics.render(), media_type=CONTENT_TYPE)
