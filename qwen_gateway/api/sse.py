"""Server-sent events: the one place a stream's bytes go out.

The protocol's renderer produces the frames (``api/render/``); this module only sends them, adds a
comment line while the renderer is silent (a long prefill) so proxies keep the connection open, and
closes the frames as soon as the client goes away so generation stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

log = logging.getLogger(__name__)

KEEPALIVE = b": keep-alive\n\n"
HEADERS = [
    (b"content-type", b"text/event-stream;charset=UTF-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


async def _with_keepalive(frames: AsyncIterator[bytes], every: float) -> AsyncGenerator[bytes, None]:
    pending: asyncio.Future[bytes] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(frames))
            done, _ = await asyncio.wait({pending}, timeout=every)
            if not done:
                yield KEEPALIVE
                continue
            task, pending = pending, None
            try:
                frame = task.result()
            except StopAsyncIteration:
                return
            yield frame
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending


class SSEResponse(Response):
    """An ASGI response that streams ``frames`` and closes them as soon as the client goes away.

    Starlette's StreamingResponse only notices a disconnect when a write fails; here a second task
    waits for ``http.disconnect`` so generation is cancelled even while the engine is between tokens.
    """

    def __init__(
        self,
        frames: AsyncGenerator[bytes, None],
        *,
        keepalive: float,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status_code=200)
        self._frames = frames
        self._keepalive = keepalive
        self._sse_headers = list(HEADERS) + [
            (k.lower().encode(), v.encode()) for k, v in (headers or {}).items()
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self._sse_headers})
        body = _with_keepalive(self._frames, self._keepalive)

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
                await self._frames.aclose()
        if pump_task.done() and not pump_task.cancelled() and pump_task.exception() is not None:
            exc = pump_task.exception()
            if not isinstance(exc, OSError):  # a client gone mid-write is not an error of ours
                log.error("sending a stream failed", exc_info=exc)
