"""API-key rows. Only hashes are stored; making and checking keys is ``service/keys.py``'s job."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Row, func, select, update

from qwen_gateway.store.db import Database, insert_unless_taken, reading, transaction
from qwen_gateway.store.tables import api_keys


@dataclass(frozen=True, slots=True)
class KeyRow:
    id: str
    name: str
    prefix: str
    # Kept out of repr so a logged row never carries even the hash.
    key_hash: str = field(repr=False)
    created_at: datetime
    revoked_at: datetime | None
    balance_micro: int | None  # None: unmetered; else micro-CNY, holds of running requests taken out
    rpm_limit: int | None = None
    tpm_limit: int | None = None

    @property
    def metered(self) -> bool:
        return self.balance_micro is not None

    @property
    def limited(self) -> bool:
        return self.rpm_limit is not None or self.tpm_limit is not None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


class DuplicateKeyName(Exception):
    """``insert_key`` was given a name another key already has."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def new_key_id() -> str:
    return "key_" + secrets.token_hex(6)


async def insert_key(
    *,
    store: Database,
    name: str,
    prefix: str,
    key_hash: str,
    key_id: str | None = None,
    created_at: datetime | None = None,
    balance_micro: int | None = None,
    rpm_limit: int | None = None,
    tpm_limit: int | None = None,
) -> KeyRow:
    """Insert a key row. Raises :class:`DuplicateKeyName` if ``name`` is taken."""
    row = KeyRow(
        id=key_id or new_key_id(),
        name=name,
        prefix=prefix,
        key_hash=key_hash,
        created_at=created_at or datetime.now(UTC),
        revoked_at=None,
        balance_micro=balance_micro,
        rpm_limit=rpm_limit,
        tpm_limit=tpm_limit,
    )
    values = {
        "id": row.id,
        "name": row.name,
        "prefix": row.prefix,
        "key_hash": row.key_hash,
        "created_at": row.created_at,
        "revoked_at": None,
        "balance_micro": row.balance_micro,
        "rpm_limit": row.rpm_limit,
        "tpm_limit": row.tpm_limit,
    }
    if not await insert_unless_taken(store, api_keys, values, unique="name"):
        raise DuplicateKeyName(name)
    return row


async def find_active_key_by_hash(*, store: Database, key_hash: str) -> KeyRow | None:
    """The unrevoked key whose hash is ``key_hash``, if any."""
    query = select(api_keys).where(api_keys.c.key_hash == key_hash, api_keys.c.revoked_at.is_(None))
    async with reading(store) as conn:
        found = (await conn.execute(query)).first()
    return None if found is None else _row(found)


async def get_key(*, store: Database, name_or_id: str) -> KeyRow | None:
    """The key (revoked or not) with this id, else with this name."""
    async with reading(store) as conn:
        for column in (api_keys.c.id, api_keys.c.name):
            found = (await conn.execute(select(api_keys).where(column == name_or_id))).first()
            if found is not None:
                return _row(found)
    return None


async def list_keys(*, store: Database, include_revoked: bool = True) -> list[KeyRow]:
    """Keys in creation order."""
    query = select(api_keys).order_by(api_keys.c.created_at, api_keys.c.id)
    if not include_revoked:
        query = query.where(api_keys.c.revoked_at.is_(None))
    async with reading(store) as conn:
        return [_row(r) for r in (await conn.execute(query)).all()]


async def revoke_key(*, store: Database, name_or_id: str, now: datetime | None = None) -> KeyRow | None:
    """Revoke the key with this id (else this name). Returns the row as it is now, or None if unknown.

    Revoking a revoked key changes nothing and returns it with its original ``revoked_at``.
    """
    when = now or datetime.now(UTC)
    async with transaction(store) as conn:
        # Write first: on SQLite a transaction that reads and then writes can fail with "database is
        # locked" without waiting if another process wrote in between; one that starts by writing waits.
        for column in (api_keys.c.id, api_keys.c.name):
            statement = (
                update(api_keys)
                .where(column == name_or_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=when)
                .returning(*api_keys.c)
            )
            changed = (await conn.execute(statement)).first()
            if changed is not None:
                return _row(changed)
            # An id match that is already revoked must not fall through to a name match.
            existing = (await conn.execute(select(api_keys).where(column == name_or_id))).first()
            if existing is not None:
                return _row(existing)
        return None


async def top_up(*, store: Database, key_id: str, amount_micro: int) -> KeyRow | None:
    """Add ``amount_micro`` to the key's balance in one UPDATE (an unmetered key becomes metered, starting
    from zero). Returns the row as it is now, or None if there is no such key."""
    balance = api_keys.c.balance_micro
    statement = (
        update(api_keys)
        .where(api_keys.c.id == key_id)
        .values(balance_micro=func.coalesce(balance, 0) + amount_micro)
        .returning(*api_keys.c)
    )
    async with transaction(store) as conn:
        changed = (await conn.execute(statement)).first()
    return None if changed is None else _row(changed)


_UNSET: Any = object()


async def set_limits(
    *, store: Database, key_id: str, rpm_limit: int | None = _UNSET, tpm_limit: int | None = _UNSET
) -> KeyRow | None:
    """Set (an int) or clear (None) the key's RPM/TPM limits; a limit not passed is left as it is."""
    values: dict[str, Any] = {}
    if rpm_limit is not _UNSET:
        values["rpm_limit"] = rpm_limit
    if tpm_limit is not _UNSET:
        values["tpm_limit"] = tpm_limit
    statement = update(api_keys).where(api_keys.c.id == key_id).values(**values).returning(*api_keys.c)
    async with transaction(store) as conn:
        if not values:
            found = (await conn.execute(select(api_keys).where(api_keys.c.id == key_id))).first()
            return None if found is None else _row(found)
        changed = (await conn.execute(statement)).first()
    return None if changed is None else _row(changed)


def _row(row: Row[Any]) -> KeyRow:
    m = row._mapping
    return KeyRow(
        id=m["id"],
        name=m["name"],
        prefix=m["prefix"],
        key_hash=m["key_hash"],
        created_at=m["created_at"],
        revoked_at=m["revoked_at"],
        balance_micro=m["balance_micro"],
        rpm_limit=m["rpm_limit"],
        tpm_limit=m["tpm_limit"],
    )
