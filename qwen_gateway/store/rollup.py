"""Usage reports and the roll-up of old ledger rows into daily totals.

The roll-up moves ledger rows older than a cutoff into ``usage_daily`` (sums per UTC day, key, model
and status) and deletes them, in one transaction per chunk: a row is either still in the ledger or
counted in the totals, never both or neither, and every column is an integer sum, so the totals are
exact. Reports read both tables, so a report over any period is the same before and after a roll-up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from sqlalchemy import Connection, delete, func, insert, literal_column, select, update

from qwen_gateway.store.tables import usage_daily, usage_ledger

CHUNK = 5_000
SUMMED = (
    "prompt_tokens",
    "completion_tokens",
    "reasoning_tokens",
    "image_tokens",
    "video_tokens",
    "cost_micro",
    "latency_ms",
)


def roll_up(conn: Connection, *, before: datetime, limit: int = CHUNK) -> int:
    """Move up to ``limit`` ledger rows created before ``before`` into the daily totals, in the
    caller's transaction. Returns how many rows were moved (0: nothing left to roll up)."""
    rows = conn.execute(
        select(usage_ledger)
        .where(usage_ledger.c.created_at < before)
        .order_by(usage_ledger.c.id)
        .limit(limit)
    ).all()
    if not rows:
        return 0
    totals: dict[tuple[str, str, str, str], dict[str, int]] = {}
    for row in rows:
        m = row._mapping
        group = (m["created_at"].date().isoformat(), m["key_id"] or "", m["model"], m["status"])
        sums = totals.setdefault(group, dict.fromkeys(("requests", *SUMMED), 0))
        sums["requests"] += 1
        for column in SUMMED:
            sums[column] += int(m[column] or 0)
    for (day, key_id, model, status), sums in totals.items():
        where = (
            (usage_daily.c.day == day)
            & (usage_daily.c.key_id == key_id)
            & (usage_daily.c.model == model)
            & (usage_daily.c.status == status)
        )
        changed = conn.execute(
            update(usage_daily).where(where).values({c: usage_daily.c[c] + v for c, v in sums.items()})
        ).rowcount
        if changed == 0:
            conn.execute(
                insert(usage_daily).values(day=day, key_id=key_id, model=model, status=status, **sums)
            )
    ids = [row._mapping["id"] for row in rows]
    conn.execute(delete(usage_ledger).where(usage_ledger.c.id.in_(ids)))
    return len(rows)


@dataclass(slots=True)
class UsageTotal:
    """Usage of one group of a report (the group's ``day``/``key_id``/``model``; None: not grouped)."""

    day: str | None
    key_id: str | None
    model: str | None
    requests: int = 0
    sums: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SUMMED, 0))


GROUPS = ("day", "key", "model")


def usage_report(
    conn: Connection,
    *,
    group_by: Sequence[str] = GROUPS,
    key_id: str | None = None,
    since: date | None = None,
    until: date | None = None,
) -> list[UsageTotal]:
    """Totals from the ledger and the roll-ups, grouped by any of "day", "key", "model" (UTC days;
    ``since``/``until`` inclusive), sorted by the group."""
    out: dict[tuple[str | None, str | None, str | None], UsageTotal] = {}

    def add(day: str, key: str | None, model: str, requests: int, sums: dict[str, Any]) -> None:
        group = (
            day if "day" in group_by else None,
            (key or None) if "key" in group_by else None,
            model if "model" in group_by else None,
        )
        total = out.get(group)
        if total is None:
            total = out[group] = UsageTotal(*group)
        total.requests += requests
        for column in SUMMED:
            total.sums[column] += int(sums[column] or 0)

    day = _day(conn)
    ledger_query = select(
        day.label("day"),
        usage_ledger.c.key_id,
        usage_ledger.c.model,
        func.count().label("requests"),
        *(func.sum(usage_ledger.c[c]).label(c) for c in SUMMED),
    ).group_by(day, usage_ledger.c.key_id, usage_ledger.c.model)
    daily_query = select(
        usage_daily.c.day,
        usage_daily.c.key_id,
        usage_daily.c.model,
        func.sum(usage_daily.c.requests).label("requests"),
        *(func.sum(usage_daily.c[c]).label(c) for c in SUMMED),
    ).group_by(usage_daily.c.day, usage_daily.c.key_id, usage_daily.c.model)
    if key_id is not None:
        ledger_query = ledger_query.where(usage_ledger.c.key_id == key_id)
        daily_query = daily_query.where(usage_daily.c.key_id == key_id)
    for query in (ledger_query, daily_query):
        for row in conn.execute(query).all():
            m = row._mapping
            when = str(m["day"])
            if (since is not None and when < since.isoformat()) or (
                until is not None and when > until.isoformat()
            ):
                continue
            add(when, m["key_id"], m["model"], int(m["requests"]), dict(m))
    return [out[k] for k in sorted(out, key=lambda g: tuple(x or "" for x in g))]


def _day(conn: Connection) -> Any:
    """The UTC day of a ledger row, as "YYYY-MM-DD", in this database's SQL."""
    column = usage_ledger.c.created_at
    # Constants as literals, not bind parameters: PostgreSQL only matches the GROUP BY expression to the
    # selected one when they are identical, and two parameters are two different expressions.
    if conn.dialect.name == "postgresql":
        return func.to_char(func.timezone(literal_column("'UTC'"), column), literal_column("'YYYY-MM-DD'"))
    # SQLite keeps the UTC wall-clock text (store/tables.UtcDateTime): its first 10 characters.
    return func.substr(column, literal_column("1"), literal_column("10"))
