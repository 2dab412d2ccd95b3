"""Every route of the keyed routers refuses a request without a valid key, whether it runs directly
(KeyedRoute's fast path) or through FastAPI's dependency; real server on loopback, FAKE engine."""

from __future__ import annotations

from pathlib import Path

import httpx
from fastapi.routing import APIRoute

from qwen_gateway.api.app import API_PREFIXES, NATIVE_API_PREFIX
from qwen_gateway.api.deps import KeyedRoute
from qwen_gateway.api.routes import batches, chat, files, models, native
from tests.fakes import FaultyEngine
from tests.unit.api.test_inproc_server import serve_fake

ROUTERS = {prefix: (chat.router, models.router, files.router, batches.router) for prefix in API_PREFIXES}
ROUTERS[NATIVE_API_PREFIX] = (native.router,)


def _routes() -> list[tuple[str, str, bool]]:
    """(method, path with sample parameters, runs directly) of every keyed route."""
    out = []
    for prefix, routers in ROUTERS.items():
        for router in routers:
            for route in router.routes:
                assert isinstance(route, APIRoute) and isinstance(route, KeyedRoute), route
                path = prefix + route.path.replace("{model_id:path}", "qwen-plus")
                path = path.replace("{file_id}", "file-x").replace("{batch_id}", "batch-x")
                out.extend((method, path, route.direct) for method in route.methods)
    return out


def test_every_keyed_route_refuses_a_missing_or_wrong_key(tmp_path: Path) -> None:
    routes = _routes()
    # Both kinds are there: the generation routes run directly, the ones with path parameters don't.
    assert ("POST", "/v1/chat/completions", True) in routes
    assert ("GET", "/v1/files/file-x", False) in routes
    with (
        serve_fake(tmp_path, FaultyEngine(1, fail=False)) as (base, key, _),
        httpx.Client(base_url=base, timeout=30) as client,
    ):
        for method, path, _direct in routes:
            for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": key}):
                r = client.request(method, path, headers=headers, json={})
                assert r.status_code == 401, (method, path, headers, r.text)
                if path.startswith(NATIVE_API_PREFIX):  # DashScope's own envelope
                    assert r.json()["code"] == "InvalidApiKey", (method, path, r.text)
                else:
                    assert r.json()["error"]["code"] == "invalid_api_key", (method, path, r.text)
        # And the right key gets through both kinds.
        auth = {"Authorization": f"Bearer {key}"}
        assert client.get("/v1/models/qwen-plus", headers=auth).status_code == 200
        r = client.post(
            "/v1/chat/completions",
            headers=auth,
            json={"model": "qwen-plus", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert r.status_code == 200
