"""Request dependencies: the gateway's services and the caller's API key."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Request

from qwen_gateway.errors import AuthenticationError

if TYPE_CHECKING:
    from qwen_gateway.service.runtime import Gateway
    from qwen_gateway.store.keys import KeyRow


def get_gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


async def require_key(request: Request) -> KeyRow:
    """``Authorization: Bearer sk-...``; anything else is DashScope's 401 ``invalid_api_key``."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError()
    key: KeyRow = await get_gateway(request).keys.authenticate(token.strip())
    request.state.key = key
    return key


def key_id_of(request: Request) -> str | None:
    key = getattr(request.state, "key", None)
    return None if key is None else str(key.id)
