"""The app factory: one FastAPI app around one opened :class:`~qwen_gateway.service.runtime.Gateway`.

The gateway (store, engines, services) is opened and closed by whoever runs the app
(``qwen_gateway.server.serve``), so a checkpoint that fails to load stops startup before a port is bound.
Two apps over two gateways can live in one process: nothing here is module-level state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI

from qwen_gateway import __version__
from qwen_gateway.api import errors
from qwen_gateway.api.deps import require_key
from qwen_gateway.api.middleware import RequestIdMiddleware
from qwen_gateway.api.routes import chat, health, models

if TYPE_CHECKING:
    from qwen_gateway.service.runtime import Gateway

# DashScope's own prefix, and plain /v1 for clients configured the OpenAI way.
API_PREFIXES = ("/compatible-mode/v1", "/v1")


def create_app(gateway: Gateway) -> FastAPI:
    app = FastAPI(title="qwen-gateway", version=__version__, docs_url=None, redoc_url=None)
    app.state.gateway = gateway
    for prefix in API_PREFIXES:
        for router in (chat.router, models.router):
            app.include_router(router, prefix=prefix, dependencies=[Depends(require_key)])
    app.include_router(health.router)
    errors.install(app)
    app.add_middleware(RequestIdMiddleware)
    return app
