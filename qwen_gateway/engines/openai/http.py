"""The engine's HTTP side: one pooled keep-alive aiohttp session per engine, a server-sent event
reader over a streamed response, and the parsing of a whole (non-streamed) answer.

aiohttp rather than httpx: reading 20-chunk streams from benchmarks/bench_upstream.py's mock, httpx's
``AsyncClient.send`` + ``aiter_lines`` cost 2.2-3.5 ms CPU per request on this machine, an aiohttp
session with the line splitting below 0.3-0.75 ms (httpx's pure-Python h11 parser and anyio layers
run per chunk; aiohttp parses HTTP in C). ``benchmarks/bench_http_clients.py`` prints these figures;
benchmarks/results_upstream.md has them.

Nothing here maps errors: the engine does that at its boundary (engine.py), so every aiohttp or
socket exception stays below ``engines/``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import aiohttp
import orjson

from qwen_gateway.engines.openai.wire import UpstreamProtocolError

# An upstream line longer than this (no newline in sight) is not a chat-completion chunk: refused
# rather than buffered without bound.
MAX_LINE = 8 * 2**20
# After the last event ([DONE] or finish + usage), how long the rest of the body (the end marker, the
# chunked terminator) may take before the connection is dropped instead of going back to the pool:
# a conforming upstream sends it at once; a slow one must not hold up the answer's end.
DRAIN_TIMEOUT = 1.0


def session(
    *, max_connections: int, connect_timeout: float, headers: Mapping[str, str]
) -> aiohttp.ClientSession:
    """The engine's one session: every replica and request share its pool of HTTP/1.1 keep-alive
    connections (h2 multiplexing would put all streams of a replica on one connection, one slow reader
    stalling the rest)."""
    connector = aiohttp.TCPConnector(limit=max_connections, limit_per_host=0, keepalive_timeout=60.0)
    return aiohttp.ClientSession(
        connector=connector,
        # Reads are bounded per event by first-byte / idle timeouts of the engine's own.
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=None),
        headers=dict(headers),
        trust_env=False,  # never route upstream traffic through an environment proxy
        raise_for_status=False,
    )


def dumps(body: Mapping[str, Any]) -> bytes:
    """A request body as JSON (UTF-8, not ASCII-escaped); tool schemas may be any Mapping."""
    return orjson.dumps(body, default=_plain)


def _plain(value: object) -> object:
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def loads(data: bytes) -> Any:
    """One JSON document from the upstream (a whole answer); not JSON is a protocol error."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        raise UpstreamProtocolError(f"not JSON: {data[:200]!r}") from None


def sse_payloads(body: bytes) -> list[Any]:
    """The ``data:`` payloads of a whole event-stream body already read (an upstream that streamed
    although asked for one answer), parsed, up to ``[DONE]``."""
    out = []
    for line in body.split(b"\n"):
        if line.startswith(b"data:"):
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            out.append(loads(data))
    return out


class EventStream:
    """The ``data:`` payloads of one streamed response, parsed, in order.

    Reads what the connection has and splits it into lines itself (one read often carries several
    events), so awaiting, and a timeout, happen per network read rather than per line."""

    __slots__ = ("_content", "_lines", "_pos", "_tail", "ended")

    def __init__(self, content: aiohttp.StreamReader) -> None:
        self._content = content  # a response's body (``ClientResponse.content``)
        self._lines: list[bytes] = []
        self._pos = 0
        self._tail = b""
        self.ended = False  # [DONE] or the end of the body was read

    async def next(self, timeout: float | None = None) -> Any | None:
        """The next payload, or None at ``[DONE]`` or the body's end. ``timeout``: seconds this call
        may wait in all (from now to the next event); TimeoutError when it passes."""
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        while True:
            lines, pos = self._lines, self._pos
            while pos < len(lines):
                line = lines[pos]
                pos += 1
                if not line.startswith(b"data:"):
                    continue  # blank separators, ": keep-alive" comments, event:/id: fields
                self._pos = pos
                data = line[5:].strip()
                if data == b"[DONE]":
                    self.ended = True
                    return None
                try:
                    return orjson.loads(data)
                except orjson.JSONDecodeError:
                    raise UpstreamProtocolError(f"not JSON: {data[:200]!r}") from None
            self._pos = pos
            if self.ended:
                return None
            if deadline is None:
                chunk = await self._content.readany()
            else:
                async with asyncio.timeout_at(deadline):
                    chunk = await self._content.readany()
            if not chunk:  # the body's end; a last line without its newline still counts
                self.ended = True
                self._lines, self._pos, self._tail = [self._tail], 0, b""
                continue
            lines = (self._tail + chunk).split(b"\n") if self._tail else chunk.split(b"\n")
            self._tail = lines.pop()
            if len(self._tail) > MAX_LINE:
                raise UpstreamProtocolError(f"a line of over {MAX_LINE} bytes: {self._tail[:200]!r}")
            self._lines, self._pos = lines, 0

    async def drain(self) -> bool:
        """Read the rest of the body (the end marker, the chunked terminator) so the connection can be
        reused; False if it did not end within :data:`DRAIN_TIMEOUT` (the caller drops it then)."""
        content = self._content
        if content.at_eof():
            return True  # all read already: no timer to arm
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT):
                while not content.at_eof():
                    if not await content.readany():
                        break
        except (aiohttp.ClientError, OSError):  # TimeoutError is an OSError
            return False
        return True
