"""Admin-key rows (hashes only; ``service/admin.py`` makes and checks the keys) and the admin's reads."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Row, func, select, update

from qwen_gateway.store.db import Database, insert_unless_taken, reading, transaction
from qwen_gateway.store.tables import admin_keys, holds, usage_daily, usage_ledger


@dataclass(frozen=True, slots=True)
class AdminKeyRow:
    id: str
    name: str
    prefix: str
    key_hash: str = field(repr=False)  # out of repr: a logged row never carries even the hash
    created_at: datetime
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


class DuplicateAdminName(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


async def insert_admin_key(*, store: Database, name: str, prefix: str, key_hash: str) -> AdminKeyRow:
    """Insert an admin key; :class:`DuplicateAdminName` if ``name`` is taken."""
    row = AdminKeyRow(
        id="adm_" + secrets.token_hex(6),
        name=name,
        prefix=prefix,
        key_hash=key_hash,
        created_at=datetime.now(UTC),
        revoked_at=None,
    )
    values = {f: getattr(row, f) for f in ("id", "name", "prefix", "key_hash", "created_at", "revoked_at")}
    if not await insert_unless_taken(store, admin_keys, values, unique="name"):
        raise DuplicateAdminName(name)
    return row


async def find_active_admin_key(*, store: Database, key_hash: str) -> AdminKeyRow | None:
    query = select(admin_keys).where(admin_keys.c.key_hash == key_hash, admin_keys.c.revoked_at.is_(None))
    async with reading(store) as conn:
        found = (await conn.execute(query)).first()
    return None if found is None else _row(found)


async def list_admin_keys(*, store: Database) -> list[AdminKeyRow]:
    query = select(admin_keys).order_by(admin_keys.c.created_at, admin_keys.c.id)
    async with reading(store) as conn:
        return [_row(r) for r in (await conn.execute(query)).all()]


async def revoke_admin_key(*, store: Database, name_or_id: str) -> AdminKeyRow | None:
    """Revoke by id, else by name; the row as it is now (revoking twice keeps the first time)."""
    async with transaction(store) as conn:
        for column in (admin_keys.c.id, admin_keys.c.name):
            statement = (
                update(admin_keys)
                .where(column == name_or_id, admin_keys.c.revoked_at.is_(None))
                .values(revoked_at=datetime.now(UTC))
                .returning(*admin_keys.c)
            )
            changed = (await conn.execute(statement)).first()
            if changed is not None:
                return _row(changed)
            existing = (await conn.execute(select(admin_keys).where(column == name_or_id))).first()
            if existing is not None:
                return _row(existing)
    return None


@dataclass(frozen=True, slots=True)
class KeySpend:
    """What a key has used so far: its ledger rows and its rolled-up days together."""

    requests: int = 0
    cost_micro: int = 0
    open_holds: int = 0
    held_micro: int = 0


def key_spend(conn: Connection) -> dict[str, KeySpend]:
    """Per key id, requests and cost at the model prices (ledger + roll-ups) and the holds open right now.

    Three grouped queries for every key at once (the keys table of the console), not three per key.
    """
    totals: dict[str, list[int]] = {}

    def add(key_id: str, requests: Any, cost: Any) -> None:
        entry = totals.setdefault(key_id, [0, 0, 0, 0])
        entry[0] += int(requests or 0)
        entry[1] += int(cost or 0)

    ledger = (
        select(usage_ledger.c.key_id, func.count(), func.sum(usage_ledger.c.cost_micro))
        .where(usage_ledger.c.key_id.is_not(None))
        .group_by(usage_ledger.c.key_id)
    )
    for key_id, requests, cost in conn.execute(ledger).all():
        add(key_id, requests, cost)
    daily = (
        select(usage_daily.c.key_id, func.sum(usage_daily.c.requests), func.sum(usage_daily.c.cost_micro))
        .where(usage_daily.c.key_id != "")
        .group_by(usage_daily.c.key_id)
    )
    for key_id, requests, cost in conn.execute(daily).all():
        add(key_id, requests, cost)
    open_holds = select(holds.c.key_id, func.count(), func.sum(holds.c.amount_micro)).group_by(holds.c.key_id)
    for key_id, count, amount in conn.execute(open_holds).all():
        entry = totals.setdefault(key_id, [0, 0, 0, 0])
        entry[2] += int(count or 0)
        entry[3] += int(amount or 0)
    return {k: KeySpend(*v) for k, v in totals.items()}


def _row(row: Row[Any]) -> AdminKeyRow:
    m = row._mapping
    return AdminKeyRow(
        id=m["id"],
        name=m["name"],
        prefix=m["prefix"],
        key_hash=m["key_hash"],
        created_at=m["created_at"],
        revoked_at=m["revoked_at"],
    )
