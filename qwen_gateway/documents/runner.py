"""The parent side of extraction: one capped child process per document, killed at a deadline.

Why a process and not a thread: a thread can't be stopped (a parser spinning in a loop would hold it
for ever) and shares the server's memory (a bomb would take the server down with it). A child with
``setrlimit`` caps and a wall-clock deadline bounds both; its start (~0.2 s of CPU for the interpreter
and the parser imports) is small next to an upload.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Reason codes a refusal carries (worker.py and extract.py raise them).
REASONS = frozenset(
    {
        "unsupported",
        "encrypted",
        "bomb",
        "nested_archive",
        "too_many_pages",
        "too_much_text",
        "blank",
        "corrupt",
        "limits",
    }
)


@dataclass(frozen=True, slots=True)
class ExtractLimits:
    timeout: float
    memory_bytes: int
    max_text_chars: int
    max_pages: int
    max_archive_entries: int
    max_unpacked_bytes: int
    max_compression_ratio: int


@dataclass(frozen=True, slots=True)
class Extracted:
    text: str
    pages: int | None


class Refused(Exception):
    """The document was not read; ``reason`` is in :data:`REASONS`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason if reason in REASONS else "corrupt"


async def extract_text(path: Path, limits: ExtractLimits) -> Extracted:
    """The text of ``path``, extracted in a capped child process; :class:`Refused` otherwise."""
    caps = asdict(limits)
    timeout = caps.pop("timeout")
    caps["cpu_seconds"] = max(1, math.ceil(timeout))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "qwen_gateway.documents.worker",
        str(path),
        json.dumps(caps),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        # Its own session: a Ctrl-C at the server's terminal is the server's to handle, not the child's.
        start_new_session=True,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    # Text plus its JSON line; UTF-8 is at most 4 bytes a character.
    out_limit = 4 * limits.max_text_chars + 4096
    try:
        out, err = await asyncio.wait_for(_collect(proc, out_limit), timeout)
    except TimeoutError:
        log.info("document extraction stopped at its %ss deadline", timeout)
        raise Refused("limits") from None
    except _TooMuchOutput:
        raise Refused("too_much_text") from None
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        from qwen_gateway.documents.worker import REFUSED

        if proc.returncode == REFUSED:
            raise Refused(err.decode("ascii", "replace").strip())
        # Killed by a signal (SIGXCPU at the CPU cap, SIGKILL from the kernel) or an interpreter that
        # could not start under the memory cap: a limit, whatever the document was.
        log.info("document extraction ended with status %s", proc.returncode)
        raise Refused("limits")
    header, _, body = out.partition(b"\n")
    try:
        pages = json.loads(header)["pages"]
    except (ValueError, KeyError, TypeError):
        raise Refused("corrupt") from None
    return Extracted(body.decode("utf-8", "replace"), pages if isinstance(pages, int) else None)


class _TooMuchOutput(Exception):
    pass


async def _collect(proc: asyncio.subprocess.Process, limit: int) -> tuple[bytes, bytes]:
    assert proc.stdout is not None and proc.stderr is not None
    chunks: list[bytes] = []
    size = 0

    async def read_out() -> None:
        nonlocal size
        assert proc.stdout is not None
        while chunk := await proc.stdout.read(1024 * 1024):
            size += len(chunk)
            if size > limit:
                raise _TooMuchOutput
            chunks.append(chunk)

    err_task = asyncio.ensure_future(proc.stderr.read(4096))
    try:
        await read_out()
        err = await err_task
    finally:
        err_task.cancel()
    await proc.wait()
    return b"".join(chunks), err
