"""``X-Account-Balance`` on every answer to a metered key (seed 003: the key's balance in CNY, 4
decimals, e.g. ``123.0165``), error answers included.

The value is the request's own view when it has one (after its hold while a stream runs, after its
charge once a non-stream answer is settled, after the release when it failed); otherwise (a refused
body, ``GET /models``) the balance is read from the database as the answer starts.
"""

from __future__ import annotations

import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qwen_gateway.service.money.prices import format_money

log = logging.getLogger(__name__)

HEADER = b"x-account-balance"


class BalanceHeader:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_balance(message: Message) -> None:
            if message["type"] == "http.response.start":
                account = scope.get("state", {}).get("account")
                if account is not None and account.metered:
                    balance = account.balance_micro
                    if balance is None:
                        balance = await _read_balance(scope, account.key.id)
                    if balance is not None:
                        message["headers"] = [
                            *message.get("headers", []),
                            (HEADER, format_money(balance).encode()),
                        ]
            await send(message)

        await self.app(scope, receive, send_with_balance)


async def _read_balance(scope: Scope, key_id: str) -> int | None:
    try:
        balance: int | None = await scope["app"].state.gateway.meter.balance(key_id)
    except Exception:  # the answer must still go out; the header is then missing, and logged
        log.exception("reading the balance of key %s failed", key_id)
        return None
    return balance
