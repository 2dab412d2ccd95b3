"""Request dependencies: the gateway's services and the caller's API key."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Request

from qwen_gateway.errors import AuthenticationError

if TYPE_CHECKING:
    from qwen_gateway.service.money.meter import Account
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
    gateway = get_gateway(request)
    key: KeyRow = await gateway.keys.authenticate(token.strip())
    request.state.key = key
    # A metered or limited key's money for this request (None: a plain key, nothing to do);
    # BalanceHeader shows its balance on the answer.
    request.state.account = gateway.meter.account_for(key)
    return key


def account_of(request: Request) -> Account | None:
    account: Account | None = getattr(request.state, "account", None)
    return account


def key_id_of(request: Request) -> str | None:
    key = getattr(request.state, "key", None)
    return None if key is None else str(key.id)
