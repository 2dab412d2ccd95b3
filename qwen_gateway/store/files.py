"""Rows of uploaded files. Every read and delete is scoped by ``key_id``: another key's file is simply
not found (the API answers 404, never 403, so an id can't be probed)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import Row, and_, delete, func, or_, select, update

from qwen_gateway.store.db import Database, reading, transaction
from qwen_gateway.store.tables import api_keys, files

QuotaHit = Literal["count", "bytes"]


@dataclass(frozen=True, slots=True)
class FileRow:
    id: str
    key_id: str
    filename: str
    purpose: str
    bytes: int
    status: str
    created_at: datetime
    pages: int | None = None
    text_chars: int | None = None


def _row(r: Row[Any]) -> FileRow:
    return FileRow(
        id=r.id,
        key_id=r.key_id,
        filename=r.filename,
        purpose=r.purpose,
        bytes=r.bytes,
        status=r.status,
        created_at=r.created_at,
        pages=r.pages,
        text_chars=r.text_chars,
    )


async def insert_within_quota(
    db: Database, *, row: FileRow, max_files: int, max_bytes: int
) -> QuotaHit | None:
    """Insert ``row`` unless the key would then hold more than ``max_files`` files or ``max_bytes``
    bytes; returns which quota it hit (nothing written) or None (inserted).

    The key's row is written first, so two uploads of one key (in any process) take turns: the write
    lock on SQLite, the key's row lock on PostgreSQL. Both can't pass one last free slot."""
    async with transaction(db) as conn:
        await conn.execute(
            update(api_keys).where(api_keys.c.id == row.key_id).values(last_used_at=api_keys.c.last_used_at)
        )
        count, total = (
            await conn.execute(
                select(func.count(), func.coalesce(func.sum(files.c.bytes), 0)).where(
                    files.c.key_id == row.key_id
                )
            )
        ).one()
        if count + 1 > max_files:
            return "count"
        if total + row.bytes > max_bytes:
            return "bytes"
        await conn.execute(
            files.insert().values(
                id=row.id,
                key_id=row.key_id,
                filename=row.filename,
                purpose=row.purpose,
                bytes=row.bytes,
                status=row.status,
                pages=row.pages,
                text_chars=row.text_chars,
                created_at=row.created_at,
            )
        )
    return None


async def count_of_key(db: Database, key_id: str) -> tuple[int, int]:
    """Files a key holds and their bytes."""
    async with reading(db) as conn:
        count, total = (
            await conn.execute(
                select(func.count(), func.coalesce(func.sum(files.c.bytes), 0)).where(
                    files.c.key_id == key_id
                )
            )
        ).one()
    return int(count), int(total)


async def mark_processed(db: Database, *, file_id: str, pages: int | None, text_chars: int) -> bool:
    """False when the row is gone (its key deleted the file while it was being processed)."""
    async with transaction(db) as conn:
        result = await conn.execute(
            update(files)
            .where(files.c.id == file_id, files.c.status == "processing")
            .values(status="processed", pages=pages, text_chars=text_chars)
        )
    return bool(result.rowcount)


async def get_file(db: Database, *, key_id: str, file_id: str) -> FileRow | None:
    async with reading(db) as conn:
        r = (
            await conn.execute(select(files).where(files.c.id == file_id, files.c.key_id == key_id))
        ).one_or_none()
    return None if r is None else _row(r)


async def get_files(db: Database, *, key_id: str, file_ids: Sequence[str]) -> dict[str, FileRow]:
    async with reading(db) as conn:
        rows = (
            await conn.execute(select(files).where(files.c.id.in_(list(file_ids)), files.c.key_id == key_id))
        ).all()
    return {r.id: _row(r) for r in rows}


async def list_files(
    db: Database,
    *,
    key_id: str,
    limit: int,
    after: str | None = None,
    purpose: str | None = None,
    created_from: datetime | None = None,
    created_before: datetime | None = None,
) -> tuple[list[FileRow], bool]:
    """A key's files, newest first, and whether more follow; ``after`` is the id of the previous page's
    last file (an id the key doesn't own gives an empty page)."""
    async with reading(db) as conn:
        where = [files.c.key_id == key_id]
        if purpose is not None:
            where.append(files.c.purpose == purpose)
        if created_from is not None:
            where.append(files.c.created_at >= created_from)
        if created_before is not None:
            where.append(files.c.created_at < created_before)
        if after is not None:
            cursor = (
                await conn.execute(
                    select(files.c.created_at).where(files.c.id == after, files.c.key_id == key_id)
                )
            ).one_or_none()
            if cursor is None:
                return [], False
            at = cursor.created_at
            where.append(or_(files.c.created_at < at, and_(files.c.created_at == at, files.c.id < after)))
        rows = (
            await conn.execute(
                select(files)
                .where(*where)
                .order_by(files.c.created_at.desc(), files.c.id.desc())
                .limit(limit + 1)
            )
        ).all()
    return [_row(r) for r in rows[:limit]], len(rows) > limit


async def delete_file(db: Database, *, key_id: str, file_id: str) -> bool:
    """Delete a key's file row; False when the key has no such file."""
    async with transaction(db) as conn:
        result = await conn.execute(delete(files).where(files.c.id == file_id, files.c.key_id == key_id))
    return bool(result.rowcount)


async def delete_row(db: Database, file_id: str) -> None:
    """Delete a row whatever its key (an upload refused after its row went in, a stale one)."""
    async with transaction(db) as conn:
        await conn.execute(delete(files).where(files.c.id == file_id))


async def stale_processing(db: Database, *, before: datetime) -> list[FileRow]:
    """Rows still ``processing`` although created before ``before``: their server died mid-upload."""
    async with reading(db) as conn:
        rows = (
            await conn.execute(
                select(files).where(files.c.status == "processing", files.c.created_at < before)
            )
        ).all()
    return [_row(r) for r in rows]


async def all_ids(db: Database) -> set[str]:
    async with reading(db) as conn:
        return set((await conn.execute(select(files.c.id))).scalars())
