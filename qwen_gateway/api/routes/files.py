"""``/files`` (compatible mode): upload, list, retrieve, delete, content.

The upload is parsed as it arrives (python-multipart's streaming parser): the file part goes to disk
through the service's :class:`~qwen_gateway.service.files.Incoming` a chunk at a time and is cut off at
the size cap, so an upload is never whole in memory and an oversize one is refused without reading it
all (or, when its Content-Length already says so, without reading it at all).
"""

from __future__ import annotations

import asyncio
import os
import posixpath
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, BinaryIO
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.datastructures import QueryParams

from qwen_gateway.api.deps import KeyedRoute, get_gateway
from qwen_gateway.api.responses import JSONBytesResponse
from qwen_gateway.errors import FileTooLarge, InvalidParameter, InvalidRequest
from qwen_gateway.service.files import PURPOSES, Incoming
from qwen_gateway.store.files import FileRow

router = APIRouter(route_class=KeyedRoute)

# Multipart framing allowed on top of the file's own cap (boundaries, part headers, the purpose field).
FRAMING_BYTES = 64 * 1024
# Longest value of a plain (non-file) form field.
FIELD_LIMIT = 1024
# Longest file name kept (the database column holds 512).
NAME_LIMIT = 255
PURPOSE_MESSAGE = "'purpose' must be 'file-extract' or 'batch'"
# DashScope's list filters take a day (YYYYMMDD) or, as the batch filters do, a second (YYYYMMDDhhmmss).
DAY = re.compile(r"^\d{8}(\d{6})?$")
LIST_LIMIT_MAX = 100
LIST_LIMIT_DEFAULT = 20
# Bytes read from disk per chunk of a /content answer.
CONTENT_CHUNK = 256 * 1024
LIST_PARAMS = frozenset({"after", "limit", "purpose", "create_after", "create_before"})


class PurposeInvalid(InvalidParameter):
    # The captured refusal: type invalid_request_error, param "purpose", code null.
    code = None  # type: ignore[assignment]  # (InvalidParameter narrows it to str)


def file_object(row: FileRow) -> dict[str, Any]:
    """The compatible-mode file object (the captures' shape)."""
    return {
        "id": row.id,
        "object": "file",
        "bytes": row.bytes,
        "filename": row.filename,
        "purpose": row.purpose,
        "status": row.status,
        "created_at": int(row.created_at.timestamp()),
    }


def _key_id(request: Request) -> str:
    return str(request.state.key.id)


class _Form:
    """What the multipart callbacks collected: form fields, and file data waiting to be written."""

    def __init__(self) -> None:
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.pending: list[bytes] = []
        self.header_field = b""
        self.header_value = b""
        self.headers: dict[bytes, bytes] = {}
        self.part_name: str | None = None
        self.part_is_file = False
        self.part_data: list[bytes] = []
        self.part_size = 0
        self.error: InvalidParameter | InvalidRequest | None = None

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self.part_begin,
            "on_part_data": self.part_data_cb,
            "on_part_end": self.part_end,
            "on_header_field": self.header_field_cb,
            "on_header_value": self.header_value_cb,
            "on_header_end": self.header_end,
            "on_headers_finished": self.headers_finished,
        }

    def fail(self, error: InvalidParameter | InvalidRequest) -> None:
        if self.error is None:
            self.error = error

    def part_begin(self) -> None:
        self.headers = {}
        self.part_name, self.part_is_file, self.part_data, self.part_size = None, False, [], 0

    def header_field_cb(self, data: bytes, start: int, end: int) -> None:
        self.header_field += data[start:end]

    def header_value_cb(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def header_end(self) -> None:
        self.headers[self.header_field.strip().lower()] = self.header_value.strip()
        self.header_field, self.header_value = b"", b""

    def headers_finished(self) -> None:
        _, options = parse_options_header(self.headers.get(b"content-disposition", b""))
        name = options.get(b"name")
        if name is None:
            self.fail(InvalidRequest("Every multipart part needs a name."))
            return
        self.part_name = name.decode("utf-8", "replace")
        if self.part_name == "file":
            if self.filename is not None:
                self.fail(InvalidParameter("Only one file may be uploaded per request.", param="file"))
                return
            raw = options.get(b"filename")
            if raw is None:
                self.fail(InvalidParameter("'file' must be a file.", param="file"))
                return
            # Only the last path component: a name is a label, never a path.
            name_text = posixpath.basename(raw.decode("utf-8", "replace").replace("\\", "/"))
            self.filename = name_text[:NAME_LIMIT] or "file"
            self.part_is_file = True
        elif self.part_name != "purpose":
            self.fail(
                InvalidParameter(f"Unknown parameter: {self.part_name[:64]}", param=self.part_name[:64])
            )

    def part_data_cb(self, data: bytes, start: int, end: int) -> None:
        if self.error is not None or self.part_name is None:
            return
        if self.part_is_file:
            self.pending.append(bytes(data[start:end]))
            return
        self.part_size += end - start
        if self.part_size > FIELD_LIMIT:
            self.fail(InvalidParameter(f"'{self.part_name}' is too long.", param=self.part_name))
            return
        self.part_data.append(bytes(data[start:end]))

    def part_end(self) -> None:
        if self.error is None and self.part_name is not None and not self.part_is_file:
            if self.part_name in self.fields:
                self.fail(InvalidParameter(f"'{self.part_name}' given twice.", param=self.part_name))
                return
            self.fields[self.part_name] = b"".join(self.part_data).decode("utf-8", "replace")
        self.part_name = None


async def _receive(request: Request, upload: Incoming) -> _Form:
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise InvalidRequest("The upload must be multipart/form-data with 'file' and 'purpose' parts.")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > upload.limit + FRAMING_BYTES:
        raise FileTooLarge(upload.file_id, upload.limit)
    form = _Form()
    parser = MultipartParser(boundary, form.callbacks())  # type: ignore[arg-type]
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > upload.limit + FRAMING_BYTES:
                raise FileTooLarge(upload.file_id, upload.limit)
            parser.write(chunk)
            if form.error is not None:
                raise form.error
            # Known before the file's bytes (the SDKs send it first): the id a refusal names.
            upload.purpose_hint = form.fields.get("purpose", upload.purpose_hint)
            for piece in form.pending:
                await upload.write(piece)
            form.pending.clear()
        parser.finalize()
    except MultipartParseError:
        raise InvalidRequest("The multipart body is malformed.") from None
    if form.error is not None:
        raise form.error
    return form


@router.post("/files")
async def upload_file(request: Request) -> Response:
    files = get_gateway(request).files
    async with files.incoming() as upload:
        form = await _receive(request, upload)
        purpose = form.fields.get("purpose")
        if purpose not in PURPOSES:
            raise PurposeInvalid(PURPOSE_MESSAGE, param="purpose")
        if form.filename is None:
            raise InvalidParameter("'file' is required.", param="file")
        row = await files.create(upload, key_id=_key_id(request), purpose=purpose, filename=form.filename)
    return JSONBytesResponse(file_object(row))


def _day(value: str | None, param: str) -> datetime | None:
    if value is None:
        return None
    if not DAY.match(value):
        raise InvalidParameter(f"{param} must be a date as YYYYMMDD (or YYYYMMDDhhmmss).", param=param)
    try:
        return datetime.strptime(value.ljust(14, "0"), "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    except ValueError:
        raise InvalidParameter(f"{param} is not a valid date.", param=param) from None


def list_limit(query: QueryParams, allowed: frozenset[str]) -> int:
    """A list request's ``limit`` (DashScope's default and range, shared by files and batches), after
    refusing any query parameter not in ``allowed`` with a 400 naming it."""
    for name in query:
        if name not in allowed:
            raise InvalidParameter(f"Unknown parameter: {name[:64]}", param=name[:64])
    raw_limit = query.get("limit")
    if raw_limit is None:
        return LIST_LIMIT_DEFAULT
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= LIST_LIMIT_MAX:
        raise InvalidParameter(f"Range of limit should be [1, {LIST_LIMIT_MAX}]", param="limit")
    return int(raw_limit)


@router.get("/files")
async def list_files(request: Request) -> Response:
    query = request.query_params
    limit = list_limit(query, LIST_PARAMS)
    purpose = query.get("purpose")
    if purpose is not None and purpose not in PURPOSES:
        raise PurposeInvalid(PURPOSE_MESSAGE, param="purpose")
    page = await get_gateway(request).files.page(
        key_id=_key_id(request),
        limit=limit,
        after=query.get("after") or None,
        purpose=purpose,
        # create_after names the first day included; create_before the first day left out.
        created_from=_day(query.get("create_after"), "create_after"),
        created_before=_day(query.get("create_before"), "create_before"),
    )
    return JSONBytesResponse(
        {"object": "list", "data": [file_object(r) for r in page.files], "has_more": page.has_more}
    )


@router.get("/files/{file_id}")
async def retrieve_file(request: Request, file_id: str) -> Response:
    row = await get_gateway(request).files.get(key_id=_key_id(request), file_id=file_id)
    return JSONBytesResponse(file_object(row))


@router.delete("/files/{file_id}")
async def delete_file(request: Request, file_id: str) -> Response:
    await get_gateway(request).files.delete(key_id=_key_id(request), file_id=file_id)
    return JSONBytesResponse({"id": file_id, "object": "file", "deleted": True})


@router.get("/files/{file_id}/content")
async def file_content(request: Request, file_id: str) -> Response:
    row, handle = await get_gateway(request).files.content(key_id=_key_id(request), file_id=file_id)
    size = os.fstat(handle.fileno()).st_size
    # Streamed from the file opened by the lookup (a delete meanwhile can't make this a 500); the
    # stored name only as a download hint, quoted the way Starlette's FileResponse does.
    quoted = quote(row.filename)
    disposition = (
        f"attachment; filename*=utf-8''{quoted}"
        if quoted != row.filename
        else f'attachment; filename="{row.filename}"'
    )
    return StreamingResponse(
        _chunks(handle),
        media_type="application/octet-stream",
        headers={"Content-Length": str(size), "Content-Disposition": disposition},
    )


async def _chunks(handle: BinaryIO) -> AsyncIterator[bytes]:
    try:
        while chunk := await asyncio.to_thread(handle.read, CONTENT_CHUNK):
            yield chunk
    finally:
        handle.close()
