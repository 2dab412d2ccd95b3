"""Request dependencies: the gateway's services and the caller's API key."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, get_type_hints

from fastapi import Depends, Request, params
from fastapi.routing import APIRoute
from starlette.responses import Response

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


class KeyedRoute(APIRoute):
    """A route that needs the caller's API key: a router of them is ``APIRouter(route_class=KeyedRoute)``,
    so the key requirement is part of the router's declaration.

    A route whose endpoint takes only the :class:`Request` and returns a :class:`Response` (the chat
    and native generation routes: every request the gateway exists for) runs :func:`require_key` and
    the endpoint itself, without FastAPI's per-request dependency solver and handler (about 20 µs
    of CPU a request in a micro-benchmark here, half of the framework's own cost). Any other route gets
    :func:`require_key` as an ordinary dependency. Include such a router without ``dependencies=``:
    a route run directly would not run them.
    """

    def __init__(
        self,
        path: str,
        endpoint: Callable[..., Any],
        *,
        dependencies: Sequence[params.Depends] | None = None,
        **kwargs: Any,
    ) -> None:
        self.direct = not dependencies and _takes_only_the_request(endpoint)
        if not self.direct:
            dependencies = [Depends(require_key), *(dependencies or [])]
        super().__init__(path, endpoint, dependencies=dependencies, **kwargs)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        if not self.direct:
            return super().get_route_handler()
        endpoint = self.endpoint

        async def handler(request: Request) -> Response:
            await require_key(request)
            response: Response = await endpoint(request)
            return response

        return handler


def _takes_only_the_request(endpoint: Callable[..., Any]) -> bool:
    if not inspect.iscoroutinefunction(endpoint):
        return False
    hints = get_type_hints(endpoint)
    names = list(inspect.signature(endpoint).parameters)
    returns = hints.get("return")
    return (
        len(names) == 1
        and hints.get(names[0]) is Request
        and isinstance(returns, type)
        and issubclass(returns, Response)
    )
