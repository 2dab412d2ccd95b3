"""Server-sent events: the one place a stream's bytes go out.

The protocol's renderer produces the frames (``api/render/``); this module only sends them, adds a
comment line while the renderer is silent (a long prefill) so proxies keep the connection open, and
closes the frames as soon as the client goes away so generation stops at once.

Frames are written by one writer, apart from the task that makes them: every frame made while the
writer was busy (a socket write waiting for the client to read) or in the same loop iteration (an
engine that hands over several tokens at once) goes out as one write. A frame never waits for a later
one: the writer takes what there is as soon as the producer pauses, so a slow producer's frames still
go out one by one, at once.
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
# Bytes of frames that may wait for a writer held up by a slow reader before the producer waits too
# (so a client that doesn't read holds the engine back, as a socket buffer would).
MAX_PENDING_BYTES = 64 * 1024


class _Outbox:
    """The frames made and not yet written, and the two waits around them: the writer's (for a frame)
    and the producer's (for room, past :data:`MAX_PENDING_BYTES`). Used by one stream, on its loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._frames: list[bytes] = []
        self._size = 0
        self._ready: asyncio.Future[None] | None = None  # the writer waits for a frame
        self._room: asyncio.Future[None] | None = None  # the producer waits for the writer
        self.closed = False  # no more frames will come
        self.gone = False  # the client went away: nothing more is written

    def put(self, frame: bytes) -> bool:
        """Queue ``frame``; whether the producer should now wait for :meth:`room`."""
        self._frames.append(frame)
        self._size += len(frame)
        self._wake()
        return self._size >= MAX_PENDING_BYTES

    async def room(self) -> None:
        """Return once the frames waiting are under :data:`MAX_PENDING_BYTES`."""
        while self._size >= MAX_PENDING_BYTES and not self.gone:
            self._room = self._loop.create_future()
            await self._room

    def close(self) -> None:
        self.closed = True
        self._wake()

    def abort(self) -> None:
        self.gone = True
        self._wake()

    async def take(self) -> bytes | None:
        """Every frame waiting, as one piece, as soon as there is one; None once closed and empty, or
        once the client has gone."""
        while not self._frames or self.gone:
            if self.gone or self.closed:
                return None
            self._ready = self._loop.create_future()
            await self._ready
        frames = self._frames
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        self._frames = []
        self._size = 0
        if self._room is not None and not self._room.done():
            self._room.set_result(None)
        return data

    @property
    def empty(self) -> bool:
        return not self._frames

    def _wake(self) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)
        if self.gone and self._room is not None and not self._room.done():
            self._room.set_result(None)


class SSEResponse(Response):
    """An ASGI response that streams ``frames`` and closes them as soon as the client goes away.

    Starlette's StreamingResponse only notices a disconnect when a write fails; here a task waits
    for ``http.disconnect`` so generation is cancelled even while the engine is between tokens. The
    frames are made in another task (the producer) and written by this one (see the module's
    docstring).
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
        outbox = _Outbox(loop)
        # When something was last written: the keep-alive timer adds a comment only into a silence of
        # ``keepalive`` seconds, never after the end. One timer per stream (a callback, not a task)
        # instead of a timed wait per frame keeps the per-chunk cost to the write itself.
        last = [loop.time()]
        timer: list[asyncio.TimerHandle] = []

        def keepalive() -> None:
            if outbox.closed or outbox.gone:
                return
            if loop.time() - last[0] >= self._keepalive:
                outbox.put(KEEPALIVE)
                last[0] = loop.time()
            timer[0] = loop.call_at(last[0] + self._keepalive, keepalive)

        async def produce() -> None:
            try:
                async for frame in self._frames:
                    if outbox.put(frame):
                        await outbox.room()
            finally:
                outbox.close()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            outbox.abort()

        producer = asyncio.create_task(produce())
        tasks = (producer, asyncio.create_task(watch()))
        timer.append(loop.call_at(last[0] + self._keepalive, keepalive))
        failure: BaseException | None = None
        try:
            ended = False
            while (data := await outbox.take()) is not None:
                # The last frames carry the end of the body with them (one write less).
                ended = outbox.closed and outbox.empty and _ended_well(producer)
                await send({"type": "http.response.body", "body": data, "more_body": not ended})
                last[0] = loop.time()
            if not ended and not outbox.gone and _ended_well(producer):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # a client gone mid-write is not an error of ours
            pass
        except Exception as exc:
            failure = exc
        finally:
            timer[0].cancel()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task
            with contextlib.suppress(BaseException):
                await self._frames.aclose()
        if failure is None and producer.done() and not producer.cancelled():
            failure = producer.exception()
        if failure is not None and not isinstance(failure, OSError):
            log.error("sending a stream failed", exc_info=failure)


def _ended_well(producer: asyncio.Task[None]) -> bool:
    """Whether the frames have all been made (the producer closes the outbox as it ends, in the same
    step); a renderer that failed ends no body."""
    return producer.done() and not producer.cancelled() and producer.exception() is None
