"""Server-sent events: the one place a stream's bytes go out.

The protocol's renderer produces the frames (``api/render/``); this module only sends them, adds a
comment line while the renderer is silent (a long prefill) so proxies keep the connection open, and
closes the frames as soon as the client goes away so generation stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

log = logging.getLogger(__name__)

KEEPALIVE = b": keep-alive\n\n"
HEADERS = [
    (b"content-type", b"text/event-stream;charset=UTF-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


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
        loop = asyncio.get_running_loop()
        # When something was last sent, and whether the body has ended: the keep-alive task sends a
        # comment only into a silence of ``keepalive`` seconds, never after the end. One timer per
        # stream instead of a timed wait per frame keeps the per-chunk cost to the send itself.
        state = {"last": loop.time(), "ended": False}

        async def pump() -> None:
            async for chunk in self._frames:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                state["last"] = loop.time()
            state["ended"] = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def keepalive() -> None:
            while True:
                await asyncio.sleep(max(0.0, state["last"] + self._keepalive - loop.time()))
                if state["ended"]:
                    return
                if loop.time() - state["last"] >= self._keepalive:
                    await send({"type": "http.response.body", "body": KEEPALIVE, "more_body": True})
                    state["last"] = loop.time()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        pump_task = asyncio.create_task(pump())
        tasks = (pump_task, asyncio.create_task(watch()), asyncio.create_task(keepalive()))
        try:
            await asyncio.wait(tasks[:2], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task
            with contextlib.suppress(BaseException):
                await self._frames.aclose()
        if pump_task.done() and not pump_task.cancelled() and pump_task.exception() is not None:
            exc = pump_task.exception()
            if not isinstance(exc, OSError):  # a client gone mid-write is not an error of ours
                log.error("sending a stream failed", exc_info=exc)
