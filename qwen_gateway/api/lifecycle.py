"""The shutdown coordinator: how running requests learn that the server is stopping.

The server (``qwen_gateway/server.py``) stops accepting, lets running requests finish for the grace
period, then calls :meth:`Shutdown.expire`. A stream waiting for its next chunk then ends itself: the
engine stream is closed (so the ledger row is written with the tokens really used), an in-band error
event and ``[DONE]`` go out, and one log line says so. A non-stream call answers 503 instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator

from qwen_gateway.errors import ApiError, ShuttingDown
from qwen_gateway.service.events import ChoiceEvent, StreamFailed, UsageReport

log = logging.getLogger(__name__)


class Shutdown:
    """One per app (``app.state.shutdown``); every method is called on the event loop."""

    def __init__(self) -> None:
        self.draining = False
        self._expired = asyncio.Event()

    def begin(self) -> None:
        """No new connections are accepted from now on; running requests continue."""
        self.draining = True

    def expire(self) -> None:
        """The grace period is over: every request still running ends now."""
        self.draining = True
        self._expired.set()

    @property
    def expired(self) -> bool:
        return self._expired.is_set()

    async def wait(self) -> None:
        """Return when the grace period is over (never, while the server runs)."""
        await self._expired.wait()


# Seconds a generating stream's in-flight step may take to land once the grace period is over:
# stopping at a token boundary lets the service report the usage the client is billed for. (Under
# load, with every other stream stopping at once, one engine step took over a second.) The server
# cancels whatever is still running a while after this (server.WRAP_UP_SECONDS).
STOP_AT_BOUNDARY_SECONDS = 5.0


async def resume_until_shutdown(
    first: asyncio.Future[ChoiceEvent | None],
    rest: AsyncGenerator[ChoiceEvent, None],
    shutdown: Shutdown,
    request_id: str,
) -> AsyncGenerator[ChoiceEvent, None]:
    """``rest`` again, starting with the event the route already asked it for (``first``), until the
    shutdown grace period ends; then one :class:`StreamFailed` (:class:`ShuttingDown`) ends it.

    The stop is thrown into the service's generator at a token boundary, so the service ends the
    request itself: its ledger row and the failure event carry the tokens really generated. A
    request still queued or in a long prefill is cancelled instead (nothing was generated yet).
    """
    pending: asyncio.Future[ChoiceEvent | None] | None = first
    started = False
    # One waiter for the whole stream, not one per event.
    stop: asyncio.Future[None] = asyncio.ensure_future(shutdown.wait())
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(rest, None))
            if not pending.done() and not stop.done():
                await asyncio.wait((pending, stop), return_when=asyncio.FIRST_COMPLETED)
            if not pending.done() and started:
                await asyncio.wait({pending}, timeout=STOP_AT_BOUNDARY_SECONDS)
            if pending.done():
                event = pending.result()
                pending = None
                if event is None:
                    return
                started = True
                yield event
                if isinstance(event, StreamFailed | UsageReport) or not shutdown.expired:
                    continue  # (after UsageReport the request is complete: let it end)
                log.info("request %s: stopped by the server's shutdown (grace period over)", request_id)
                try:
                    failed = await rest.athrow(ShuttingDown())
                except StopAsyncIteration:
                    return
                except ApiError as exc:  # raised where the service doesn't turn errors into events
                    failed = StreamFailed(exc, before_output=False)
                yield failed
                return
            # Queued or prefilling (nothing generated to report), or a step that never landed.
            log.info(
                "request %s: stopped by the server's shutdown (grace period over, %s)",
                request_id,
                "mid-step" if started else "before generating",
            )
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
            pending = None
            yield StreamFailed(ShuttingDown(), before_output=False)
            return
    finally:
        stop.cancel()
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        await rest.aclose()
