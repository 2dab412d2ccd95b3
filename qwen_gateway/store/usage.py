"""The usage ledger: one row per finished (or failed, or cancelled) generation request."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Row, select

from qwen_gateway.store.db import Database, reading, transaction
from qwen_gateway.store.tables import usage_ledger

USAGE_STATUSES = frozenset({"ok", "error", "cancelled"})


@dataclass(frozen=True, slots=True)
class UsageRow:
    id: int
    request_id: str
    key_id: str | None
    model: str
    endpoint: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost: Decimal | None
    status: str
    created_at: datetime


async def record_usage(
    *,
    store: Database,
    request_id: str,
    key_id: str | None,
    model: str,
    endpoint: str,
    prompt_tokens: int,
    completion_tokens: int,
    status: str,
    cost: Decimal | float | None = None,
    created_at: datetime | None = None,
) -> UsageRow:
    """Append one ledger row in one transaction (or in the caller's, when given a connection).

    ``status`` is one of :data:`USAGE_STATUSES`; ``key_id`` is None for unauthenticated requests; a
    float ``cost`` is converted through its decimal text (``0.1`` stays ``0.1``, not its binary value).
    """
    if status not in USAGE_STATUSES:
        raise ValueError(f"usage status must be one of {sorted(USAGE_STATUSES)}, got {status!r}")
    if prompt_tokens < 0 or completion_tokens < 0:
        raise ValueError("token counts can't be negative")
    if isinstance(cost, float):
        cost = Decimal(repr(cost))
    row = UsageRow(
        id=0,  # assigned by the database
        request_id=request_id,
        key_id=key_id,
        model=model,
        endpoint=endpoint,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        cost=cost,
        status=status,
        created_at=created_at or datetime.now(UTC),
    )
    values = {f.name: getattr(row, f.name) for f in fields(row) if f.name != "id"}
    async with transaction(store) as conn:
        result = await conn.execute(usage_ledger.insert().values(**values).returning(usage_ledger.c.id))
        row_id = result.scalar_one()
    return replace(row, id=int(row_id))


async def list_usage(
    *,
    store: Database,
    key_id: str | None = None,
    request_id: str | None = None,
    limit: int | None = None,
) -> list[UsageRow]:
    """Ledger rows, oldest first, optionally for one key or one request; ``limit`` keeps the newest."""
    query = select(usage_ledger)
    if key_id is not None:
        query = query.where(usage_ledger.c.key_id == key_id)
    if request_id is not None:
        query = query.where(usage_ledger.c.request_id == request_id)
    if limit is not None:
        newest = query.order_by(usage_ledger.c.id.desc()).limit(limit).subquery()
        query = select(newest)
    query = query.order_by(query.selected_columns.id)
    async with reading(store) as conn:
        return [_row(r) for r in (await conn.execute(query)).all()]


def _row(row: Row[Any]) -> UsageRow:
    m = row._mapping
    return UsageRow(
        id=m["id"],
        request_id=m["request_id"],
        key_id=m["key_id"],
        model=m["model"],
        endpoint=m["endpoint"],
        prompt_tokens=m["prompt_tokens"],
        completion_tokens=m["completion_tokens"],
        total_tokens=m["total_tokens"],
        cost=m["cost"],
        status=m["status"],
        created_at=m["created_at"],
    )
