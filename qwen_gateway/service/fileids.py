"""Qwen-Long's ``fileid://`` references: a system message naming uploaded files gets their text.

DashScope's form (reference §1.3): the whole content of a **system** message is ``fileid://<id>``, or
several comma-joined (``fileid://a,fileid://b``); several such system messages may appear. The text
extracted at upload replaces the reference for this request only, so its tokens are counted (and billed)
as input tokens, on every call, as DashScope bills them. Only models of the ``qwen-long`` family read
references (a config may give another id that family); to any other model the text is plain text, as
on DashScope.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from qwen_gateway.engines.base import TextPart
from qwen_gateway.errors import (
    ApiError,
    ContextLengthExceeded,
    FileInvalid,
    FileNotReady,
    FileReferenceNotFound,
    FilesExceedContext,
    TooManyFiles,
)

if TYPE_CHECKING:
    from qwen_gateway.service.files import FileService
    from qwen_gateway.service.validation import ChatCall

SCHEME = "fileid://"
# Between documents injected into one message.
SEPARATOR = "\n\n"


def references(call: ChatCall) -> list[tuple[int, list[str]]]:
    """(message index, file ids) of each system message that is a ``fileid://`` reference."""
    found: list[tuple[int, list[str]]] = []
    for index, message in enumerate(call.generation.messages):
        if message.role != "system":
            continue
        content = message.content
        text = (
            content
            if isinstance(content, str)
            else "".join(p.text for p in content if isinstance(p, TextPart))
        )
        stripped = text.strip()
        if not stripped.startswith(SCHEME):
            continue
        ids: list[str] = []
        for item in stripped.split(","):
            item = item.strip()
            if not item.startswith(SCHEME) or len(item) == len(SCHEME):
                # "fileid://a, and some words": not a reference list DashScope reads.
                raise FileReferenceNotFound(item or "", param=f"messages.{index}.content")
            ids.append(item[len(SCHEME) :])
        found.append((index, ids))
    return found


async def inject(call: ChatCall, files: FileService, *, key_id: str | None, max_files: int) -> ChatCall:
    """``call`` with every ``fileid://`` system message replaced by its files' text (unchanged when the
    model doesn't read references or the call has none)."""
    if call.model.spec.family != "qwen-long":
        return call
    refs = references(call)
    if not refs:
        return call
    wanted = [file_id for _, ids in refs for file_id in ids]
    if len(wanted) > max_files:
        raise TooManyFiles(param=f"messages.{refs[-1][0]}.content")
    rows, texts = ({}, {}) if key_id is None else await files.texts(key_id=key_id, file_ids=wanted)
    messages = list(call.generation.messages)
    for index, ids in refs:
        param = f"messages.{index}.content"
        for file_id in ids:
            row = rows.get(file_id)
            if row is None:
                raise FileReferenceNotFound(file_id, param=param)
            if row.status != "processed":
                raise FileNotReady(param=param)
            if file_id not in texts:
                # A batch input file is not a document.
                error = FileInvalid(file_id, "unsupported")
                error.param = param
                raise error
        messages[index] = dataclasses.replace(
            messages[index], content=SEPARATOR.join(texts[file_id] for file_id in ids)
        )
    generation = dataclasses.replace(call.generation, messages=tuple(messages))
    return dataclasses.replace(call, generation=generation, files=tuple(wanted))


def map_error(call: ChatCall, error: ApiError) -> ApiError:
    """DashScope's own text when the documents make the prompt too long for the model."""
    if call.files and isinstance(error, ContextLengthExceeded):
        return FilesExceedContext(call.model.spec.context_length)
    return error
