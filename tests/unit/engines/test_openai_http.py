"""The openai engine's server-sent event reader (engines/openai/http.py), through the engine's own
aiohttp session against a real aiohttp server on loopback that writes the body in pieces the way a
connection may deliver it: split anywhere, CRLF or LF line ends, comments and fields other than
``data:``, a last line without its newline."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from qwen_gateway.engines.openai.http import MAX_LINE, EventStream, dumps, loads, session, sse_payloads
from qwen_gateway.engines.openai.wire import UpstreamProtocolError

BODY = (
    b": keep-alive comment\r\n"
    b"event: message\r\n"
    b'data: {"choices":[{"delta":{"content":"n\\u00e4"}}]}\r\n'
    b"\r\n"
    b'data: {"choices":[{"delta":{"content":"x"},"finish_reason":"stop"}]}\n\n'
    b'data:{"usage":{"prompt_tokens":7}}\n\n'
    b"data: [DONE]\n\n"
)
PAYLOADS = [
    {"choices": [{"delta": {"content": "nä"}}]},
    {"choices": [{"delta": {"content": "x"}, "finish_reason": "stop"}]},
    {"usage": {"prompt_tokens": 7}},
]


async def _served(
    pieces: list[bytes], use: Callable[[EventStream], Awaitable[Any]], *, hold: bool = False
) -> Any:
    """``use`` on the events of a body written as ``pieces`` (each written and flushed on its own);
    ``hold``: the server keeps the body open after them until ``use`` is done."""
    done = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in pieces:
            await response.write(piece)
            await asyncio.sleep(0)  # let each piece leave as its own write
        if hold:
            await done.wait()
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    client = session(max_connections=4, connect_timeout=30, headers={})
    try:
        async with client.get(f"http://127.0.0.1:{port}/") as response:
            try:
                return await use(EventStream(response.content))
            finally:
                done.set()
    finally:
        await client.close()
        await runner.cleanup()


async def _all(events: EventStream) -> list[Any]:
    out = []
    while (payload := await events.next(timeout=60)) is not None:
        out.append(payload)
    assert events.ended
    return out


@pytest.mark.parametrize("size", [1, 7, 64, len(BODY)])
def test_events_split_anywhere_come_out_whole_and_in_order(size: int) -> None:
    pieces = [BODY[i : i + size] for i in range(0, len(BODY), size)]

    async def use(events: EventStream) -> list[Any]:
        out = await _all(events)
        assert await events.drain()  # the body's end read: the connection can be reused
        return out

    assert asyncio.run(_served(pieces, use)) == PAYLOADS


def test_a_last_line_without_its_newline_still_counts_and_the_body_end_ends() -> None:
    pieces = [b'data: {"a": 1}\n\ndata: {"b": 2}']
    assert asyncio.run(_served(pieces, _all)) == [{"a": 1}, {"b": 2}]


def test_garbage_and_overlong_lines_are_protocol_errors() -> None:
    async def first(events: EventStream) -> Any:
        return await events.next(timeout=60)

    with pytest.raises(UpstreamProtocolError, match="not JSON"):
        asyncio.run(_served([b"data: <html>\n\n"], first))
    with pytest.raises(UpstreamProtocolError, match="a line of over"):
        asyncio.run(_served([b"data: " + b"x" * (MAX_LINE + 1)], first))


def test_no_event_within_the_timeout_is_a_timeout_error() -> None:
    async def use(events: EventStream) -> Any:
        return await events.next(timeout=0.2)

    with pytest.raises(TimeoutError):
        asyncio.run(_served([b'data: {"a": '], use, hold=True))  # half an event, then nothing


def test_request_bodies_keep_unicode_and_take_any_mapping() -> None:
    from types import MappingProxyType

    body = {
        "messages": [{"content": "你好"}],
        "tools": [{"parameters": MappingProxyType({"type": "object"})}],
    }
    assert (
        dumps(body) == '{"messages":[{"content":"你好"}],"tools":[{"parameters":{"type":"object"}}]}'.encode()
    )


def test_a_whole_event_stream_body_gives_the_same_payloads() -> None:
    # An upstream that streamed although asked for one answer: its body, read whole, is parsed the same.
    assert sse_payloads(BODY) == PAYLOADS
    assert sse_payloads(BODY + b'data: {"after": "done"}\n\n') == PAYLOADS  # nothing past [DONE]
    with pytest.raises(UpstreamProtocolError, match="not JSON"):
        sse_payloads(b"data: <html>\n\n")


def test_a_whole_answer_that_is_not_json_is_a_protocol_error() -> None:
    assert loads(b'{"a": 1}') == {"a": 1}
    with pytest.raises(UpstreamProtocolError, match="not JSON"):
        loads(b"<html>this is not json</html>")


def test_an_upstream_429_passes_its_retry_after_on_when_it_is_seconds() -> None:
    from qwen_gateway.engines.openai.engine import _status_error
    from qwen_gateway.errors import EngineOverloaded

    for given, expected in (
        ("7", 7),
        (" 12 ", 12),
        (None, 1),
        ("0", 1),
        ("100000", 300),
        ("²", 1),
        ("Wed, 21 Oct 2026 07:28:00 GMT", 1),
        ("-5", 1),
        ("1.5", 1),
    ):
        error = _status_error(429, given)
        assert isinstance(error, EngineOverloaded) and error.retry_after == expected, given
