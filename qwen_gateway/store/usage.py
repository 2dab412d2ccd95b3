"""The usage ledger: one row per finished (or failed, or cancelled) generation request."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Row, select

from qwen_gateway.store.db import Database, reading, transaction
from qwen_gateway.store.tables import usage_ledger

# "expired": the request's server process died before settling it (its hold was released, see
# store/money.py); its tokens are unknown and it is charged nothing.
USAGE_STATUSES = frozenset({"ok", "error", "cancelled", "expired"})


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
    cost_micro: int | None
    status: str
    created_at: datetime
    reasoning_tokens: int = 0
    image_tokens: int = 0
    video_tokens: int = 0
    latency_ms: int | None = None
    usage_source: str = "engine"


@dataclass(frozen=True, slots=True)
class NewUsage:
    """A ledger row not yet written (no id). Checked when built, so a bad row fails at its caller.

    ``status`` is one of :data:`USAGE_STATUSES`; ``key_id`` is None for unauthenticated requests;
    ``created_at`` defaults to now, i.e. when the request ended rather than when the row is written.

    Settlement (store/money.py) reads two more fields that are not columns: ``held_micro`` is the hold
    the request took at admission (None: its key is unmetered, no money moves); ``rate_second`` is the
    bucket of its key's rate window it was counted in, with ``rate_tokens`` (its estimate), which
    settlement corrects to its real token count. For a metered key the
    row's ``cost_micro`` is then what it is charged (capped so the balance never goes below zero).
    """

    request_id: str
    key_id: str | None
    model: str
    endpoint: str
    prompt_tokens: int
    completion_tokens: int
    status: str
    cost_micro: int | None = None
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    reasoning_tokens: int = 0
    image_tokens: int = 0
    video_tokens: int = 0
    latency_ms: int | None = None
    usage_source: str = "engine"  # "engine" | "local" (see tables.usage_ledger)
    held_micro: int | None = None
    rate_second: int | None = None
    rate_tokens: int = 0

    def __post_init__(self) -> None:
        if self.status not in USAGE_STATUSES:
            raise ValueError(f"usage status must be one of {sorted(USAGE_STATUSES)}, got {self.status!r}")
        if self.prompt_tokens < 0 or self.completion_tokens < 0:
            raise ValueError("token counts can't be negative")
        if min(self.reasoning_tokens, self.image_tokens, self.video_tokens) < 0:
            raise ValueError("token counts can't be negative")

    def values(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "key_id": self.key_id,
            "model": self.model,
            "endpoint": self.endpoint,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "image_tokens": self.image_tokens,
            "video_tokens": self.video_tokens,
            "cost_micro": self.cost_micro,
            "status": self.status,
            "latency_ms": self.latency_ms,
            "created_at": self.created_at,
            "usage_source": self.usage_source,
        }


async def insert_usage(*, store: Database, rows: Sequence[NewUsage]) -> None:
    """Append ``rows`` with one multi-row statement in one transaction (or in the caller's).

    This is the ledger writer's path: a whole batch costs one statement and one commit. Either every
    row is written or none is (the caller decides what to do with a batch that fails).
    """
    if not rows:
        return
    async with transaction(store) as conn:
        await conn.execute(usage_ledger.insert(), [row.values() for row in rows])


def insert_usage_sync(*, conn: Connection, rows: Sequence[NewUsage]) -> None:
    """:func:`insert_usage` on a synchronous connection (run in a worker thread; see store/threaded.py)."""
    if not rows:
        return
    with conn.begin():
        conn.execute(usage_ledger.insert(), [row.values() for row in rows])


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
    cost_micro: int | None = None,
    created_at: datetime | None = None,
) -> UsageRow:
    """Append one ledger row in one transaction (or in the caller's, when given a connection), and
    return it with its id. Values are checked as for :class:`NewUsage`."""
    new = NewUsage(
        request_id=request_id,
        key_id=key_id,
        model=model,
        endpoint=endpoint,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        status=status,
        cost_micro=cost_micro,
        created_at=created_at or datetime.now(UTC),
    )
    values = new.values()
    async with transaction(store) as conn:
        result = await conn.execute(usage_ledger.insert().values(**values).returning(usage_ledger.c.id))
        row_id = result.scalar_one()
    return UsageRow(id=int(row_id), **values)


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
        cost_micro=m["cost_micro"],
        status=m["status"],
        created_at=m["created_at"],
        reasoning_tokens=m["reasoning_tokens"],
        image_tokens=m["image_tokens"],
        video_tokens=m["video_tokens"],
        latency_ms=m["latency_ms"],
        usage_source=m["usage_source"],
    )
