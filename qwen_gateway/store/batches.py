"""Rows of batches and of their lines. Reads by the API are scoped by ``key_id`` (another key's batch is
simply not found); the worker's functions (``claim``, the ``*_sync`` jobs) are not, they run batches.

The ``*_sync`` functions take a synchronous :class:`~sqlalchemy.Connection` inside a transaction: the
worker runs them through the ledger writer (``LedgerWriter.run``), so a line's result, its ledger row
and its charge commit in one transaction (service/batches.py says what that guarantees).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, and_, delete, func, insert, or_, select, update

from qwen_gateway.store import money
from qwen_gateway.store.db import Database, reading, transaction
from qwen_gateway.store.tables import (
    api_keys,
    batch_lines,
    batches,
    files,
    gateway_instances,
    holds,
    rate_windows,
    usage_ledger,
)
from qwen_gateway.store.usage import NewUsage

# Statuses of a batch the worker still has something to do for.
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")


@dataclass(frozen=True, slots=True)
class BatchRow:
    id: str
    key_id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str
    metadata_json: str | None
    ds_name: str | None
    errors_json: str | None
    output_file_id: str | None
    error_file_id: str | None
    total: int
    completed: int
    failed: int
    owner: str | None
    deadline: datetime
    created_at: datetime
    in_progress_at: datetime | None = None
    finalizing_at: datetime | None = None
    completed_at: datetime | None = None
    failed_at: datetime | None = None
    expired_at: datetime | None = None
    cancelling_at: datetime | None = None
    cancelled_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class LineRow:
    batch_id: str
    line: int
    custom_id: str | None
    request_id: str
    body: str
    state: str
    result: str | None
    attempts: int


@dataclass(frozen=True, slots=True)
class NewFile:
    """An output or error file's row, inserted with the batch's final status."""

    id: str
    key_id: str
    filename: str
    bytes: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class WindowEntry:
    """Where an admission was counted in its key's rate window: the bucket (epoch second) and the
    tokens it was counted with."""

    key_id: str
    second: int
    tokens: int


def _batch(r: Row[Any]) -> BatchRow:
    return BatchRow(**{name: getattr(r, name) for name in BatchRow.__dataclass_fields__})


def _line(r: Row[Any]) -> LineRow:
    return LineRow(**{name: getattr(r, name) for name in LineRow.__dataclass_fields__})


# -- the API's operations (one key's batches) ------------------------------------------------------


async def insert_batch(db: Database, row: BatchRow) -> None:
    async with transaction(db) as conn:
        await conn.execute(
            insert(batches).values(**{k: getattr(row, k) for k in BatchRow.__dataclass_fields__})
        )


async def get_batch(db: Database, *, key_id: str, batch_id: str) -> BatchRow | None:
    async with reading(db) as conn:
        r = (
            await conn.execute(select(batches).where(batches.c.id == batch_id, batches.c.key_id == key_id))
        ).one_or_none()
    return None if r is None else _batch(r)


async def list_batches(
    db: Database,
    *,
    key_id: str,
    limit: int,
    after: str | None = None,
    statuses: Sequence[str] = (),
    ds_name: str | None = None,
    created_from: datetime | None = None,
    created_before: datetime | None = None,
    input_file_ids: Sequence[str] = (),
) -> tuple[list[BatchRow], bool]:
    """A key's batches, newest first, and whether more follow; ``after`` is the previous page's last id
    (one the key doesn't own gives an empty page). ``ds_name`` matches a part of the name."""
    where: list[Any] = [batches.c.key_id == key_id]
    if statuses:
        where.append(batches.c.status.in_(list(statuses)))
    if ds_name:
        escaped = ds_name.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        where.append(batches.c.ds_name.like(f"%{escaped}%", escape="\\"))
    if created_from is not None:
        where.append(batches.c.created_at >= created_from)
    if created_before is not None:
        where.append(batches.c.created_at < created_before)
    if input_file_ids:
        where.append(batches.c.input_file_id.in_(list(input_file_ids)))
    async with reading(db) as conn:
        if after is not None:
            cursor = (
                await conn.execute(
                    select(batches.c.created_at).where(batches.c.id == after, batches.c.key_id == key_id)
                )
            ).one_or_none()
            if cursor is None:
                return [], False
            at = cursor.created_at
            where.append(
                or_(batches.c.created_at < at, and_(batches.c.created_at == at, batches.c.id < after))
            )
        rows = (
            await conn.execute(
                select(batches)
                .where(*where)
                .order_by(batches.c.created_at.desc(), batches.c.id.desc())
                .limit(limit + 1)
            )
        ).all()
    return [_batch(r) for r in rows[:limit]], len(rows) > limit


async def request_cancel(db: Database, *, key_id: str, batch_id: str, now: datetime) -> BatchRow | None:
    """Move a key's running batch to ``cancelling`` (the worker finishes the cancellation); the batch as
    it is afterwards, None when the key has no such batch."""
    async with transaction(db) as conn:
        await conn.execute(
            update(batches)
            .where(
                batches.c.id == batch_id,
                batches.c.key_id == key_id,
                batches.c.status.in_(("validating", "in_progress")),
            )
            .values(status="cancelling", cancelling_at=now)
        )
        r = (
            await conn.execute(select(batches).where(batches.c.id == batch_id, batches.c.key_id == key_id))
        ).one_or_none()
    return None if r is None else _batch(r)


# -- the worker's --------------------------------------------------------------------------------


async def claim(db: Database, *, owner: str) -> list[BatchRow]:
    """Take over the active batches nobody runs (new ones, and those of processes gone from
    ``gateway_instances``); lines a gone process left running go back to pending. Returns every active
    batch ``owner`` now runs."""
    async with transaction(db) as conn:
        live = select(gateway_instances.c.id)
        orphaned = (
            (
                await conn.execute(
                    select(batches.c.id).where(
                        batches.c.status.in_(ACTIVE),
                        or_(batches.c.owner.is_(None), batches.c.owner.not_in(live)),
                    )
                )
            )
            .scalars()
            .all()
        )
        if orphaned:
            await conn.execute(
                update(batches)
                .where(
                    batches.c.id.in_(list(orphaned)),
                    or_(batches.c.owner.is_(None), batches.c.owner.not_in(live)),
                )
                .values(owner=owner)
            )
            await conn.execute(
                update(batch_lines)
                .where(batch_lines.c.batch_id.in_(list(orphaned)), batch_lines.c.state == "running")
                .values(state="pending")
            )
        rows = (
            await conn.execute(
                select(batches)
                .where(batches.c.owner == owner, batches.c.status.in_(ACTIVE))
                .order_by(batches.c.created_at, batches.c.id)
            )
        ).all()
    return [_batch(r) for r in rows]


async def get_active(db: Database, *, batch_id: str) -> BatchRow | None:
    async with reading(db) as conn:
        r = (await conn.execute(select(batches).where(batches.c.id == batch_id))).one_or_none()
    return None if r is None else _batch(r)


async def set_validated(db: Database, *, batch_id: str, lines: Sequence[LineRow], now: datetime) -> bool:
    """The validated lines in, the batch ``in_progress``; False (nothing written) when it is no longer
    validating (cancelled meanwhile)."""
    async with transaction(db) as conn:
        result = await conn.execute(
            update(batches)
            .where(batches.c.id == batch_id, batches.c.status == "validating")
            .values(status="in_progress", in_progress_at=now, total=len(lines))
        )
        if not result.rowcount:
            return False
        if lines:
            await conn.execute(
                insert(batch_lines),
                [{k: getattr(line, k) for k in LineRow.__dataclass_fields__} for line in lines],
            )
    return True


async def set_status(db: Database, *, batch_id: str, status: str, **values: Any) -> None:
    async with transaction(db) as conn:
        await conn.execute(update(batches).where(batches.c.id == batch_id).values(status=status, **values))


async def pending_lines(db: Database, *, batch_id: str, limit: int) -> list[LineRow]:
    async with reading(db) as conn:
        rows = (
            await conn.execute(
                select(batch_lines)
                .where(batch_lines.c.batch_id == batch_id, batch_lines.c.state == "pending")
                .order_by(batch_lines.c.line)
                .limit(limit)
            )
        ).all()
    return [_line(r) for r in rows]


async def line_states(db: Database, *, batch_id: str) -> dict[str, int]:
    async with reading(db) as conn:
        rows = (
            await conn.execute(
                select(batch_lines.c.state, func.count())
                .where(batch_lines.c.batch_id == batch_id)
                .group_by(batch_lines.c.state)
            )
        ).all()
    return {state: int(n) for state, n in rows}


async def results(db: Database, *, batch_id: str) -> list[tuple[str, str]]:
    """(state, result line) of every finished line, in line order."""
    async with reading(db) as conn:
        rows = (
            await conn.execute(
                select(batch_lines.c.state, batch_lines.c.result)
                .where(batch_lines.c.batch_id == batch_id, batch_lines.c.result.is_not(None))
                .order_by(batch_lines.c.line)
            )
        ).all()
    return [(r.state, r.result) for r in rows]


async def finalize(
    db: Database, *, batch_id: str, status: str, output: NewFile | None, error: NewFile | None, now: datetime
) -> None:
    """The output and error files' rows and the batch's final status, in one transaction; idempotent (a
    file row already there from an earlier, interrupted attempt stays)."""
    async with transaction(db) as conn:
        for new in (output, error):
            if new is None:
                continue
            exists = (await conn.execute(select(files.c.id).where(files.c.id == new.id))).first()
            if exists is None:
                await conn.execute(
                    insert(files).values(
                        id=new.id,
                        key_id=new.key_id,
                        filename=new.filename,
                        purpose="batch_output",
                        bytes=new.bytes,
                        status="processed",
                        pages=None,
                        text_chars=None,
                        created_at=new.created_at,
                    )
                )
        stamp = {"completed": "completed_at", "cancelled": "cancelled_at", "expired": "expired_at"}[status]
        await conn.execute(
            update(batches)
            .where(batches.c.id == batch_id)
            .values(
                status=status,
                output_file_id=None if output is None else output.id,
                error_file_id=None if error is None else error.id,
                **{stamp: now},
            )
        )


# -- line jobs (in the ledger writer's transaction) ------------------------------------------------


def forget_attempt_sync(conn: Connection, *, request_id: str) -> None:
    """Undo what an abandoned attempt of a line left: its hold (the money goes back to the key) and the
    "expired" ledger row a sweep wrote for it when its process died (it charged nothing: the line is
    charged by the attempt that finishes it, under the same request id)."""
    held = conn.execute(
        delete(holds).where(holds.c.request_id == request_id).returning(holds.c.key_id, holds.c.amount_micro)
    ).first()
    if held is not None:
        conn.execute(
            update(api_keys)
            .where(api_keys.c.id == held.key_id)
            .values(balance_micro=api_keys.c.balance_micro + held.amount_micro)
        )
    conn.execute(
        delete(usage_ledger).where(
            usage_ledger.c.request_id == request_id,
            usage_ledger.c.status == "expired",
            func.coalesce(usage_ledger.c.cost_micro, 0) == 0,
        )
    )


def start_line_sync(conn: Connection, *, batch_id: str, line: int, request_id: str) -> bool:
    """pending -> running (an attempt more); False when the line is not pending (nothing done)."""
    result = conn.execute(
        update(batch_lines)
        .where(
            batch_lines.c.batch_id == batch_id, batch_lines.c.line == line, batch_lines.c.state == "pending"
        )
        .values(state="running", attempts=batch_lines.c.attempts + 1)
    )
    if not result.rowcount:
        return False
    forget_attempt_sync(conn, request_id=request_id)
    return True


def finish_line_sync(
    conn: Connection, *, batch_id: str, line: int, state: str, result: str, usage: NewUsage | None
) -> int | None:
    """running -> ``state`` ("done" / "failed") with its result line, its ledger row and charge
    (``usage``, through ``store/money.settle``) and the batch's count, all in the caller's transaction.
    Returns the key's balance after the charge (None: no money moved)."""
    balance = money.settle(conn, rows=[usage])[0] if usage is not None else None
    updated = conn.execute(
        update(batch_lines)
        .where(
            batch_lines.c.batch_id == batch_id, batch_lines.c.line == line, batch_lines.c.state == "running"
        )
        .values(state=state, result=result)
    )
    if updated.rowcount != 1:
        # Not ours to finish (should not happen): raising rolls the charge back with it.
        raise RuntimeError(f"line {line} of {batch_id} is not running")
    counter = batches.c.completed if state == "done" else batches.c.failed
    conn.execute(update(batches).where(batches.c.id == batch_id).values({counter: counter + 1}))
    return balance


def release_line_sync(
    conn: Connection, *, batch_id: str, line: int, request_id: str, window: WindowEntry | None = None
) -> None:
    """running -> pending (the attempt was stopped: the server is closing, or a live request preempted
    it); its hold goes back. ``window``: the attempt's admission also leaves the key's rate window (a
    bucket already out of the window is gone: nothing to take out)."""
    forget_attempt_sync(conn, request_id=request_id)
    if window is not None:
        conn.execute(
            update(rate_windows)
            .where(
                rate_windows.c.key_id == window.key_id,
                rate_windows.c.second == window.second,
                rate_windows.c.requests > 0,
            )
            .values(
                requests=rate_windows.c.requests - 1,
                tokens=rate_windows.c.tokens - window.tokens,
            )
        )
    conn.execute(
        update(batch_lines)
        .where(
            batch_lines.c.batch_id == batch_id, batch_lines.c.line == line, batch_lines.c.state == "running"
        )
        .values(state="pending")
    )


async def fail_pending(db: Database, *, batch_id: str, results: dict[int, str]) -> int:
    """Pending lines -> failed with the given result lines (cancelled / expired); returns how many."""
    done = 0
    async with transaction(db) as conn:
        for line, result in results.items():
            r = await conn.execute(
                update(batch_lines)
                .where(
                    batch_lines.c.batch_id == batch_id,
                    batch_lines.c.line == line,
                    batch_lines.c.state == "pending",
                )
                .values(state="failed", result=result)
            )
            done += r.rowcount
        if done:
            await conn.execute(
                update(batches).where(batches.c.id == batch_id).values(failed=batches.c.failed + done)
            )
    return done
