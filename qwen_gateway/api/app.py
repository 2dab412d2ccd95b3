"""The app factory: one FastAPI app around one opened :class:`~qwen_gateway.service.runtime.Gateway`.

The gateway (store, engines, services) is opened and closed by whoever runs the app
(``qwen_gateway.server.serve``), so a checkpoint that fails to load stops startup before anything is served.
Two apps over two gateways can live in one process: nothing here is module-level state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qwen_gateway import __version__
from qwen_gateway.api import errors
from qwen_gateway.api.balance import BalanceHeader
from qwen_gateway.api.lifecycle import Shutdown
from qwen_gateway.api.middleware import RequestIdMiddleware
from qwen_gateway.api.routes import admin, batches, chat, files, health, metrics, models, native

if TYPE_CHECKING:
    from qwen_gateway.service.runtime import Gateway

# DashScope's own prefix, and plain /v1 for clients configured the OpenAI way.
API_PREFIXES = ("/compatible-mode/v1", "/v1")
NATIVE_API_PREFIX = "/api/v1"


def create_app(gateway: Gateway) -> FastAPI:
    app = FastAPI(
        title="qwen-gateway",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        # The schema lists every route to anyone, without a key: served only when asked for.
        openapi_url="/openapi.json" if gateway.settings.openapi else None,
        # A slash redirect is built from the Host header (a reflected `Location: http://evil.com/...`),
        # and a 307 replays the body there; an unknown path is a plain 404 instead.
        redirect_slashes=False,
    )
    app.state.gateway = gateway
    app.state.shutdown = Shutdown()
    # Every route of these routers needs an API key: their routes are KeyedRoutes (api/deps.py).
    for prefix in API_PREFIXES:
        for router in (chat.router, models.router, files.router, batches.router):
            app.include_router(router, prefix=prefix)
    # The native DashScope protocol (reference §1.4), same keys.
    app.include_router(native.router, prefix=NATIVE_API_PREFIX)
    app.include_router(health.router)
    app.include_router(metrics.router)
    # The admin API checks its own (admin) key; the console's static files need none.
    app.include_router(admin.api)
    app.include_router(admin.console)
    errors.install(app)
    app.add_middleware(BalanceHeader)
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(HeadAsGet)
    return app


class HeadAsGet:
    """HEAD wherever GET is (load balancers probe with HEAD): routed as GET, answered with the GET's
    status and headers (Content-Length included) and no body. FastAPI routes don't add HEAD
    themselves, and routers are shared module objects, so this is done once here rather than by
    editing every route's methods."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def send_headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, send_headers_only)
