"""Uploaded files: storage on disk, per-key quotas, text extraction, and ``fileid://`` for Qwen-Long.

An upload's life, each step undone if a later one fails (so a refused upload leaves nothing behind,
on disk or in the database):

1. its bytes stream into ``<files dir>/.incoming/<hex>.part`` (:class:`Incoming`), cut off at the size
   cap; a full disk is a 400 and the partial file is removed;
2. a ``processing`` row goes in, inside the key's quota (one transaction: two uploads can't share one
   last free slot);
3. the part file is renamed to ``<files dir>/<id>`` and its text extracted in a capped child process
   (``qwen_gateway/documents``) into ``<id>.txt``;
4. the row becomes ``processed`` and the file object is answered.

A server that dies between 2 and 4 leaves a ``processing`` row; the next start removes such rows (and
their files) once they are older than any extraction could take, and part files left over.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

import orjson

from qwen_gateway.documents import ExtractLimits, Refused, extract_text
from qwen_gateway.errors import (
    FileBlank,
    FileInvalid,
    FileNotFound,
    FilePageLimit,
    FileQuotaExceeded,
    FileTooLarge,
)
from qwen_gateway.settings import FileSettings
from qwen_gateway.store import files as rows
from qwen_gateway.store.db import Store
from qwen_gateway.store.files import FileRow

log = logging.getLogger(__name__)

PURPOSES = {"file-extract": "file-fe-", "batch": "file-batch-"}
# Output and error files of batches (service/batches.py): made by the server, never uploaded.
OUTPUT_PREFIX = "file-batch_output-"
# Bytes gathered in memory before one write to disk (off the event loop).
WRITE_CHUNK = 1024 * 1024
# Left-overs younger than this may belong to another server process sharing the directory.
LEFTOVER_AGE = timedelta(hours=1)
# Longest line of a batch input file (one request).
LINE_LIMIT = 8 * 1024 * 1024


def _storage_error(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class Incoming:
    """One upload's bytes on their way to disk: never more than :data:`WRITE_CHUNK` of them in memory,
    refused past ``limit`` bytes, removed unless :meth:`FileService.create` takes them."""

    def __init__(self, directory: Path, limit: int) -> None:
        self.hex = secrets.token_hex(12)
        self.path = directory / f"{self.hex}.part"
        self.limit = limit
        self.size = 0
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._fd: int | None = None
        self.purpose_hint = "file-extract"

    @property
    def file_id(self) -> str:
        return PURPOSES.get(self.purpose_hint, "file-fe-") + self.hex

    async def open(self) -> None:
        self._fd = await asyncio.to_thread(
            os.open, self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
        )

    async def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise FileTooLarge(self.file_id, self.limit)
        self._buffer.append(data)
        self._buffered += len(data)
        if self._buffered >= WRITE_CHUNK:
            await self._flush()

    async def _flush(self) -> None:
        data, self._buffer, self._buffered = b"".join(self._buffer), [], 0
        if data:
            fd = self._fd
            assert fd is not None
            try:
                await asyncio.to_thread(_write_all, fd, data)
            except OSError as exc:
                log.warning("upload %s not stored: %s", self.file_id, os.strerror(exc.errno or 0))
                raise FileInvalid(self.file_id, "storage") from None

    async def finish(self) -> None:
        await self._flush()
        fd, self._fd = self._fd, None
        if fd is not None:
            await asyncio.to_thread(os.close, fd)

    async def discard(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(self.path.unlink)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


@dataclass(frozen=True, slots=True)
class FilePage:
    files: list[FileRow]
    has_more: bool


class FileService:
    """The Files API's operations, each for one key."""

    def __init__(self, store: Store, settings: FileSettings, home: Path) -> None:
        self.store = store
        self.settings = settings
        self.root = settings.root(home)
        self.incoming_dir = self.root / ".incoming"
        self._extractions = asyncio.Semaphore(settings.max_parallel_extractions)
        self.limits = ExtractLimits(
            timeout=settings.extract_timeout,
            memory_bytes=settings.extract_memory_bytes,
            max_text_chars=settings.max_text_chars,
            max_pages=settings.max_pages,
            max_archive_entries=settings.max_archive_entries,
            max_unpacked_bytes=settings.max_unpacked_bytes,
            max_compression_ratio=settings.max_compression_ratio,
        )

    # -- start -------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the directory; remove what a crashed server left half-done."""
        await asyncio.to_thread(self.incoming_dir.mkdir, parents=True, exist_ok=True)
        now = datetime.now(UTC)
        stale = now - timedelta(seconds=self.settings.extract_timeout) - LEFTOVER_AGE
        for row in await rows.stale_processing(self.store, before=stale):
            await self._remove(row.id)
            log.info("removed file %s left half-uploaded by a stopped server", row.id)
        await asyncio.to_thread(self._sweep_leftovers, await rows.all_ids(self.store), now - LEFTOVER_AGE)

    def _sweep_leftovers(self, known: set[str], before: datetime) -> None:
        cutoff = before.timestamp()
        for directory in (self.incoming_dir, self.root):
            for path in directory.iterdir():
                if not path.is_file() or path.stat().st_mtime >= cutoff:
                    continue
                if directory == self.root and path.name.removesuffix(".txt") in known:
                    continue
                path.unlink(missing_ok=True)

    # -- upload ------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def incoming(self) -> AsyncIterator[Incoming]:
        """A new upload's part file; removed on exit unless :meth:`create` moved it into place."""
        upload = Incoming(self.incoming_dir, self.settings.max_file_bytes)
        try:
            await upload.open()
        except OSError as exc:
            log.warning("cannot store uploads in %s: %s", self.incoming_dir, exc.strerror)
            raise FileInvalid(upload.file_id, "storage") from None
        try:
            yield upload
        finally:
            await upload.discard()

    async def create(self, upload: Incoming, *, key_id: str, purpose: str, filename: str) -> FileRow:
        """The uploaded bytes as a stored, extracted file of ``key_id``; every step undone on a refusal."""
        upload.purpose_hint = purpose
        await upload.finish()
        row = FileRow(
            id=upload.file_id,
            key_id=key_id,
            filename=filename,
            purpose=purpose,
            bytes=upload.size,
            status="processing",
            created_at=datetime.now(UTC),
        )
        hit = await rows.insert_within_quota(
            self.store,
            row=row,
            max_files=self.settings.max_files_per_key,
            max_bytes=self.settings.max_bytes_per_key,
        )
        if hit == "count":
            raise FileQuotaExceeded.files(self.settings.max_files_per_key)
        if hit == "bytes":
            raise FileQuotaExceeded.bytes(self.settings.max_bytes_per_key)
        try:
            target = self.path_of(row.id)
            await asyncio.to_thread(os.replace, upload.path, target)
            pages, chars = await self._prepare(row, target)
            if not await rows.mark_processed(self.store, file_id=row.id, pages=pages, text_chars=chars):
                # Deleted by its key while it was being read: the files go too.
                raise FileNotFound(row.id)
        except BaseException:
            # Shielded: a client that hangs up now must not leave the row or the files behind.
            await asyncio.shield(self._remove(row.id))
            raise
        return dataclasses.replace(row, status="processed", pages=pages, text_chars=chars)

    async def _prepare(self, row: FileRow, path: Path) -> tuple[int | None, int]:
        if row.purpose == "batch":
            await asyncio.to_thread(_check_jsonl, path, row.id)
            return None, 0
        async with self._extractions:
            try:
                extracted = await extract_text(path, self.limits)
            except Refused as exc:
                log.info("upload %s refused: %s", row.id, exc.reason)
                if exc.reason == "blank":
                    raise FileBlank(row.id) from None
                if exc.reason == "too_many_pages":
                    raise FilePageLimit(row.id, self.settings.max_pages) from None
                raise FileInvalid(row.id, exc.reason) from None
        text_path = self.text_path_of(row.id)
        try:
            await asyncio.to_thread(_write_text, text_path, extracted.text)
        except OSError as exc:
            if not _storage_error(exc):
                raise
            log.warning("upload %s not stored: %s", row.id, exc.strerror)
            raise FileInvalid(row.id, "storage") from None
        return extracted.pages, len(extracted.text)

    async def _remove(self, file_id: str) -> None:
        await rows.delete_row(self.store, file_id)
        for path in (self.path_of(file_id), self.text_path_of(file_id)):
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(path.unlink)

    # -- the other operations ----------------------------------------------------------------------

    def path_of(self, file_id: str) -> Path:
        return self.root / file_id

    def text_path_of(self, file_id: str) -> Path:
        return self.root / f"{file_id}.txt"

    async def get(self, *, key_id: str, file_id: str) -> FileRow:
        row = await rows.get_file(self.store, key_id=key_id, file_id=file_id) if _plausible(file_id) else None
        if row is None:
            raise FileNotFound(file_id)
        return row

    async def page(
        self,
        *,
        key_id: str,
        limit: int,
        after: str | None,
        purpose: str | None,
        created_from: datetime | None,
        created_before: datetime | None,
    ) -> FilePage:
        found, more = await rows.list_files(
            self.store,
            key_id=key_id,
            limit=limit,
            after=after,
            purpose=purpose,
            created_from=created_from,
            created_before=created_before,
        )
        return FilePage(found, more)

    async def delete(self, *, key_id: str, file_id: str) -> None:
        if not _plausible(file_id) or not await rows.delete_file(self.store, key_id=key_id, file_id=file_id):
            raise FileNotFound(file_id)
        for path in (self.path_of(file_id), self.text_path_of(file_id)):
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(path.unlink)

    async def content(self, *, key_id: str, file_id: str) -> tuple[FileRow, BinaryIO]:
        """The row and the file's bytes, opened: a delete that comes after this can't take them away
        from the answer (the open file outlives its name), and one that came between the lookup and
        the open is the 404 it would have been a moment earlier, not a 500."""
        row = await self.get(key_id=key_id, file_id=file_id)
        try:
            handle = await asyncio.to_thread(self.path_of(row.id).open, "rb")
        except FileNotFoundError:
            raise FileNotFound(file_id) from None
        return row, handle

    async def write_output(self, file_id: str, data: bytes) -> None:
        """A batch's output or error file on disk (its row goes in with the batch's final status). The
        bytes are complete under their name or not there: written aside, then renamed."""
        await asyncio.to_thread(_write_bytes, self.path_of(file_id), data)

    async def texts(self, *, key_id: str, file_ids: list[str]) -> tuple[dict[str, FileRow], dict[str, str]]:
        """A key's rows for ``file_ids`` (missing ones absent) and the extracted text of the processed
        file-extract ones."""
        found = await rows.get_files(
            self.store, key_id=key_id, file_ids=[f for f in file_ids if _plausible(f)]
        )
        texts: dict[str, str] = {}
        for file_id, row in found.items():
            if row.status == "processed" and row.purpose == "file-extract":
                texts[file_id] = await asyncio.to_thread(self.text_path_of(file_id).read_text, "utf-8")
        return found, texts


def _plausible(file_id: str) -> bool:
    """Ids are ``file-fe-`` / ``file-batch-`` / ``file-batch_output-`` + 24 hex: anything else is not
    looked up (and never becomes a path)."""
    for prefix in (*PURPOSES.values(), OUTPUT_PREFIX):
        rest = file_id.removeprefix(prefix)
        if rest != file_id and len(rest) == 24 and all(c in "0123456789abcdef" for c in rest):
            return True
    return False


def _write_bytes(path: Path, data: bytes) -> None:
    partial = path.with_suffix(".part")
    try:
        partial.write_bytes(data)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _write_text(path: Path, text: str) -> None:
    partial = path.with_suffix(".txt.part")
    try:
        partial.write_text(text, encoding="utf-8", errors="surrogatepass")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _check_jsonl(path: Path, file_id: str) -> None:
    """A batch input: UTF-8 lines, each blank or one JSON object (what each line asks is the batch's
    business when it runs)."""
    seen = False
    with path.open("rb") as fh:
        # Read a line at most LINE_LIMIT bytes at a time: one 150 MB line must not sit in memory whole.
        while line := fh.readline(LINE_LIMIT + 1):
            if len(line) > LINE_LIMIT:
                raise FileInvalid(file_id, "not_jsonl")
            if not line.strip():
                continue
            try:
                value = orjson.loads(line)
            except orjson.JSONDecodeError:
                raise FileInvalid(file_id, "not_jsonl") from None
            if not isinstance(value, dict):
                raise FileInvalid(file_id, "not_jsonl")
            seen = True
    if not seen:
        raise FileBlank(file_id)


__all__ = ["OUTPUT_PREFIX", "PURPOSES", "FilePage", "FileService", "Incoming"]
