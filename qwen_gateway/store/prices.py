"""Runtime price overrides (``price_overrides``) and their audit trail (``price_changes``).

A change and its audit row are written in one transaction, so no price is in force that the trail does
not show. Amounts are integer micro-CNY per 1K tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, delete, select, update
from sqlalchemy import insert as plain_insert

from qwen_gateway.store.db import Database, reading, transaction
from qwen_gateway.store.tables import price_changes, price_overrides

_o = price_overrides.c


@dataclass(frozen=True, slots=True)
class PriceChange:
    id: int
    model: str
    old_input_micro: int
    old_output_micro: int
    new_input_micro: int
    new_output_micro: int
    reset: bool
    admin_key_id: str
    changed_at: datetime


def read_overrides(conn: Connection) -> dict[str, tuple[int, int]]:
    """model -> (input, output) micro-CNY per 1K tokens, for every model with an override."""
    rows = conn.execute(select(_o.model, _o.input_micro, _o.output_micro)).all()
    return {model: (int(i), int(o)) for model, i, o in rows}


def _current(conn: Connection, model: str, default: tuple[int, int]) -> tuple[int, int]:
    # FOR UPDATE: two admins changing one price at once (PostgreSQL) audit each other's value, not a
    # value both read before either wrote (SQLite: the transaction writes first, see set_override).
    row = conn.execute(
        select(_o.input_micro, _o.output_micro).where(_o.model == model).with_for_update()
    ).first()
    return default if row is None else (int(row[0]), int(row[1]))


def set_override(
    conn: Connection,
    *,
    model: str,
    price: tuple[int, int],
    default: tuple[int, int],
    admin_key_id: str,
    now: datetime,
) -> tuple[int, int]:
    """Set ``model``'s price, in the caller's transaction, with its audit row; returns the old price."""
    # The audit row first: on SQLite it takes the write lock before anything is read, so the old value
    # read next can't change under this transaction (and the transaction never has to upgrade a read).
    audit = conn.execute(
        plain_insert(price_changes).values(
            model=model,
            old_input_micro=0,
            old_output_micro=0,
            new_input_micro=price[0],
            new_output_micro=price[1],
            reset=False,
            admin_key_id=admin_key_id,
            changed_at=now,
        )
    )
    old = _current(conn, model, default)
    (audit_id,) = audit.inserted_primary_key or (None,)
    conn.execute(
        update(price_changes)
        .where(price_changes.c.id == audit_id)
        .values(old_input_micro=old[0], old_output_micro=old[1])
    )
    values = {
        "input_micro": price[0],
        "output_micro": price[1],
        "updated_at": now,
        "updated_by": admin_key_id,
    }
    if conn.execute(update(price_overrides).where(_o.model == model).values(values)).rowcount == 0:
        conn.execute(plain_insert(price_overrides).values(model=model, **values))
    return old


def remove_override(
    conn: Connection, *, model: str, default: tuple[int, int], admin_key_id: str, now: datetime
) -> tuple[int, int] | None:
    """Go back to ``model``'s default price, with an audit row; returns the removed override (None: there
    was none, nothing is written)."""
    gone = conn.execute(
        delete(price_overrides).where(_o.model == model).returning(_o.input_micro, _o.output_micro)
    ).first()
    if gone is None:
        return None
    old = (int(gone[0]), int(gone[1]))
    conn.execute(
        plain_insert(price_changes).values(
            model=model,
            old_input_micro=old[0],
            old_output_micro=old[1],
            new_input_micro=default[0],
            new_output_micro=default[1],
            reset=True,
            admin_key_id=admin_key_id,
            changed_at=now,
        )
    )
    return old


def history(conn: Connection, *, limit: int = 100) -> list[PriceChange]:
    """The latest ``limit`` price changes, newest first."""
    c = price_changes.c
    rows = conn.execute(select(price_changes).order_by(c.id.desc()).limit(limit)).all()
    return [
        PriceChange(
            id=int(r.id),
            model=r.model,
            old_input_micro=int(r.old_input_micro),
            old_output_micro=int(r.old_output_micro),
            new_input_micro=int(r.new_input_micro),
            new_output_micro=int(r.new_output_micro),
            reset=bool(r.reset),
            admin_key_id=r.admin_key_id,
            changed_at=r.changed_at,
        )
        for r in rows
    ]


async def load_overrides(*, store: Database) -> dict[str, tuple[int, int]]:
    async with reading(store) as conn:
        return await conn.run_sync(read_overrides)


async def load_history(*, store: Database, limit: int = 100) -> list[PriceChange]:
    async with reading(store) as conn:
        return await conn.run_sync(lambda c: history(c, limit=limit))


async def write_override(
    *,
    store: Database,
    model: str,
    price: tuple[int, int] | None,
    default: tuple[int, int],
    admin_key_id: str,
    now: datetime,
) -> tuple[int, int] | None:
    """Set (``price``) or remove (None) an override in a transaction of its own; returns the old price
    (for a removal: the override removed, None if there was none)."""
    async with transaction(store) as conn:
        if price is None:
            return await conn.run_sync(
                lambda c: remove_override(c, model=model, default=default, admin_key_id=admin_key_id, now=now)
            )
        return await conn.run_sync(
            lambda c: set_override(
                c, model=model, price=price, default=default, admin_key_id=admin_key_id, now=now
            )
        )
