"""Server-sent events for compatible mode: the one place where a stream is framed.

Each item is one ``data:`` line of single-line JSON (the DashScope SDK parses line by line); the stream
always ends with ``data: [DONE]``, also after an in-band error. While the engine is silent (a long
prefill), a comment line keeps proxies from closing the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from qwen_gateway.errors import ApiError, EngineFailure
from qwen_gateway.protocol import compat

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"
HEADERS = [
    (b"content-type", b"text/event-stream;charset=UTF-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def encode_compat_sse(item: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(item) + b"\n\n"


def _error_frame(exc: BaseException, request_id: str) -> bytes:
    """An error that surfaced after the headers went out, as an in-band error object."""
    if not isinstance(exc, ApiError):
        log.error("stream of request %s failed", request_id, exc_info=exc)
        exc = EngineFailure()
    return encode_compat_sse(
        compat.error_dict(
            message=exc.message, type_=exc.type, code=exc.code, param=exc.param, request_id=request_id
        )
    )


async def _framed(
    items: AsyncIterator[dict[str, Any]],
    pending: asyncio.Future[dict[str, Any]] | None,
    keepalive: float,
    request_id: str,
) -> AsyncGenerator[bytes, None]:
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(items))
            done, _ = await asyncio.wait({pending}, timeout=keepalive)
            if not done:
                yield KEEPALIVE
                continue
            task, pending = pending, None
            try:
                item = task.result()
            except StopAsyncIteration:
                break
            except Exception as exc:  # raised before the service's first chunk, after our headers
                yield _error_frame(exc, request_id)
                break
            yield encode_compat_sse(item)
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
    yield DONE


class SSEResponse(Response):
    """An ASGI response that streams ``items`` and closes them as soon as the client goes away.

    Starlette's StreamingResponse only notices a disconnect when a write fails; here a second task
    waits for ``http.disconnect`` so generation is cancelled even while the engine is between tokens.
    """

    def __init__(
        self,
        items: AsyncIterator[dict[str, Any]],
        *,
        first: asyncio.Future[dict[str, Any]] | None,
        keepalive: float,
        request_id: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status_code=200)
        self._items = items
        self._first = first
        self._request_id = request_id
        self._keepalive = keepalive
        self._sse_headers = list(HEADERS) + [
            (k.lower().encode(), v.encode()) for k, v in (headers or {}).items()
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self._sse_headers})
        # ``first`` is the route's pull of the first item (done or still running): it goes out first.
        body = _framed(self._items, self._first, self._keepalive, self._request_id)

        async def pump() -> None:
            async for chunk in body:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        pump_task = asyncio.create_task(pump())
        watch_task = asyncio.create_task(watch())
        try:
            await asyncio.wait({pump_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pump_task, watch_task):
                task.cancel()
            for task in (pump_task, watch_task):
                with contextlib.suppress(BaseException):
                    await task
            with contextlib.suppress(BaseException):
                await body.aclose()
            with contextlib.suppress(BaseException):
                await self._items.aclose()  # type: ignore[attr-defined]
        if pump_task.done() and not pump_task.cancelled() and pump_task.exception() is not None:
            exc = pump_task.exception()
            if not isinstance(exc, OSError):  # a client gone mid-write is not an error of ours
                raise exc  # type: ignore[misc]
