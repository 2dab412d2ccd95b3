"""The admin side: admin keys, and what the admin API and console read and change.

Admin keys are ``qgw-admin-`` + 32 hex digits (128 random bits), shown once and stored as SHA-256 in
their own table (the reasoning of ``service/keys.py`` for a fast hash holds: they are random, not
chosen). They are never API keys: an admin key on ``/compatible-mode`` is an unknown key (401), and an
API key on the admin API is refused with 403, so a leaked user key opens nothing here. An admin
request looks its key up in SQL every time (no cache): they are rare, and a revocation by the CLI takes
effect at once in every server process.
"""

from __future__ import annotations

import builtins
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import NoReturn

from qwen_gateway.errors import AdminAccessDenied, AuthenticationError, GatewayError, ResourceNotFound
from qwen_gateway.service.keys import RAW_KEY_MAX, KeyService, hash_key
from qwen_gateway.service.money.meter import Meter
from qwen_gateway.service.money.prices import Price
from qwen_gateway.store.admin import (
    AdminKeyRow,
    DuplicateAdminName,
    KeySpend,
    find_active_admin_key,
    insert_admin_key,
    key_spend,
    list_admin_keys,
    revoke_admin_key,
)
from qwen_gateway.store.db import Store
from qwen_gateway.store.keys import KeyRow
from qwen_gateway.store.rollup import UsageTotal, usage_report

ADMIN_KEY_PREFIX = "qgw-admin-"
ADMIN_PREFIX_SHOWN = len(ADMIN_KEY_PREFIX) + 4
# Longest period the usage endpoint reports in one answer (a year of daily buckets).
MAX_USAGE_DAYS = 366


class AdminNameTaken(GatewayError):
    def __init__(self, name: str) -> None:
        super().__init__(f"an admin key named {name!r} already exists")


class InvalidAdminName(GatewayError):
    """The name can't be used for an admin key."""


def generate_admin_key() -> str:
    return ADMIN_KEY_PREFIX + secrets.token_hex(16)


@dataclass(frozen=True, slots=True)
class KeyOverview:
    """A key as the console lists it: the row (never the key itself) and what it has used."""

    key: KeyRow
    spend: KeySpend


class AdminService:
    """Admin keys over a :class:`Store`, and the admin operations over the gateway's services."""

    def __init__(self, store: Store, keys: KeyService, meter: Meter | None = None) -> None:
        self._store = store
        self._keys = keys
        self._meter = meter

    # -- admin keys ----------------------------------------------------------------------------------

    async def create_admin_key(self, name: str) -> tuple[AdminKeyRow, str]:
        """A new admin key named ``name``: its row and the key itself, which is not stored."""
        name = name.strip()
        if not name or len(name) > 100 or not name.isprintable():
            raise InvalidAdminName("an admin key name must be 1 to 100 printable characters")
        raw = generate_admin_key()
        try:
            row = await insert_admin_key(
                store=self._store, name=name, prefix=raw[:ADMIN_PREFIX_SHOWN], key_hash=hash_key(raw)
            )
        except DuplicateAdminName:
            raise AdminNameTaken(name) from None
        return row, raw

    async def list_admin_keys(self) -> builtins.list[AdminKeyRow]:
        return await list_admin_keys(store=self._store)

    async def revoke_admin_key(self, name_or_id: str) -> AdminKeyRow | None:
        return await revoke_admin_key(store=self._store, name_or_id=name_or_id)

    async def authenticate(self, raw_key: str | None) -> AdminKeyRow:
        """The active admin key for ``raw_key``.

        Missing or unknown: :class:`AuthenticationError` (401). A valid API key (not an admin key):
        :class:`AdminAccessDenied` (403), so the caller learns that this key can't do this, not that
        it is wrong.
        """
        if not raw_key or len(raw_key) > RAW_KEY_MAX:
            raise AuthenticationError()
        digest = hash_key(raw_key)
        row = await find_active_admin_key(store=self._store, key_hash=digest)
        # The lookup matched on the hash already; the constant-time comparison makes acceptance never
        # hinge on a variable-time string compare.
        if row is not None and hmac.compare_digest(row.key_hash, digest):
            return row
        await self._keys.authenticate(raw_key)  # raises AuthenticationError for an unknown key
        raise AdminAccessDenied()

    # -- keys ----------------------------------------------------------------------------------------

    async def overview(self) -> builtins.list[KeyOverview]:
        """Every key (revoked ones too), oldest first, with its requests, spend and open holds."""
        keys = await self._keys.list()
        async with self._store.connect() as conn:
            spend = await conn.run_sync(key_spend)
        return [KeyOverview(k, spend.get(k.id, KeySpend())) for k in keys]

    async def one(self, name_or_id: str) -> KeyOverview:
        key = await self._keys.get(name_or_id)
        if key is None:
            _not_found(name_or_id)
        async with self._store.connect() as conn:
            spend = await conn.run_sync(key_spend)
        return KeyOverview(key, spend.get(key.id, KeySpend()))

    async def create_key(
        self, name: str, *, balance_micro: int | None, rpm_limit: int | None, tpm_limit: int | None
    ) -> tuple[KeyRow, str]:
        """A new API key (see :meth:`KeyService.create`); the raw key is returned once."""
        return await self._keys.create(
            name, balance_micro=balance_micro, rpm_limit=rpm_limit, tpm_limit=tpm_limit
        )

    async def top_up(self, name_or_id: str, amount_micro: int) -> KeyRow:
        return _found(await self._keys.top_up(name_or_id, amount_micro), name_or_id)

    async def revoke(self, name_or_id: str) -> KeyRow:
        return _found(await self._keys.revoke(name_or_id), name_or_id)

    async def set_limits(self, name_or_id: str, **limits: int | None) -> KeyRow:
        return _found(await self._keys.set_limits(name_or_id, **limits), name_or_id)

    # -- prices and usage ----------------------------------------------------------------------------

    def prices(self, model_ids: builtins.list[str]) -> builtins.list[tuple[str, Price]]:
        """The price each served model is charged at (the catalog's, or its ``[[models]]`` override)."""
        meter = self._meter
        return [(m, meter.price(m) if meter is not None else Price(0, 0)) for m in model_ids]

    async def usage(self, *, days: int, today: date | None = None) -> builtins.list[UsageTotal]:
        """Totals per UTC day, key and model over the last ``days`` days (today included)."""
        until = today or datetime.now(UTC).date()
        since = until - timedelta(days=days - 1)

        async with self._store.connect() as conn:
            return await conn.run_sync(
                lambda c: usage_report(c, group_by=("day", "key", "model"), since=since, until=until)
            )


def _found(row: KeyRow | None, name_or_id: str) -> KeyRow:
    if row is None:
        _not_found(name_or_id)
    return row


def _not_found(name_or_id: str) -> NoReturn:
    # The name comes from the URL: echoed, but never longer than a key name can be.
    shown = name_or_id if len(name_or_id) <= 100 else name_or_id[:100] + "..."
    raise ResourceNotFound(f"No API key with name or id {shown!r}.")
