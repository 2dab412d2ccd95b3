"""The shutdown coordinator: how running requests learn that the server is stopping.

The server (``qwen_gateway/server.py``) stops accepting, lets running requests finish for the grace
period, then calls :meth:`Shutdown.expire`. A stream then ends itself at its next token boundary: the
engine stream is closed (so the ledger row is written with the tokens really used), an in-band error
event and ``[DONE]`` go out, and one log line says so. A non-stream call answers 503 instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator
from typing import Any

from qwen_gateway.errors import ShuttingDown
from qwen_gateway.service.events import ChoiceEvent, StreamFailed

log = logging.getLogger(__name__)


# Seconds a generating request may take, once the grace period is over, to reach its next token
# boundary and stop there itself (so its usage is exact). (Under load, with every other stream stopping
# at once, one engine step took over a second.) A request still waiting after that (queued, in a long
# prefill) is interrupted. The server cancels whatever is left a while later (server.WRAP_UP_SECONDS).
STOP_AT_BOUNDARY_SECONDS = 5.0

# The cancel message that marks an interruption by the shutdown (not a client gone, not a bug).
_INTERRUPT = "qwen-gateway: shutdown grace period over"


class Shutdown:
    """One per app (``app.state.shutdown``); every method is called on the event loop.

    Running requests cost it nothing per token: the service checks :attr:`expired` between tokens
    (a plain attribute read), and the tasks of requests register once so that, after the grace
    period, the ones that reach no token boundary can be interrupted.
    """

    def __init__(self) -> None:
        self.draining = False
        self._expired = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()

    def begin(self) -> None:
        """No new connections are accepted from now on; running requests continue."""
        self.draining = True

    def expire(self) -> None:
        """The grace period is over: every request still running ends now."""
        self.draining = True
        if self._expired.is_set():
            return
        self._expired.set()
        asyncio.get_running_loop().call_later(STOP_AT_BOUNDARY_SECONDS, self._interrupt)

    @property
    def expired(self) -> bool:
        return self._expired.is_set()

    async def wait(self) -> None:
        """Return when the grace period is over (never, while the server runs)."""
        await self._expired.wait()

    def register(self) -> asyncio.Task[Any] | None:
        """Mark the current task as serving a request until :meth:`unregister`."""
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        return task

    def unregister(self, task: asyncio.Task[Any] | None) -> None:
        if task is not None:
            self._tasks.discard(task)

    def _interrupt(self) -> None:
        for task in list(self._tasks):
            task.cancel(_INTERRUPT)

    def interrupted(self, exc: asyncio.CancelledError) -> bool:
        """Whether ``exc`` is this shutdown's interruption of the current task, and nothing else
        (a client that went away, the server's last-resort cancel); if so the task carries on."""
        task = asyncio.current_task()
        if not (self.expired and exc.args == (_INTERRUPT,)) or task is None or task.cancelling() != 1:
            return False
        task.uncancel()
        return True


async def resume_until_shutdown(
    first: asyncio.Future[ChoiceEvent | None],
    rest: AsyncGenerator[ChoiceEvent, None],
    shutdown: Shutdown,
    request_id: str,
) -> AsyncGenerator[ChoiceEvent, None]:
    """``rest`` again, starting with the event the route already asked it for (``first``).

    Once the grace period is over, the service itself stops ``rest`` at its next token boundary (its
    ledger row and the failure event then carry the tokens really generated). A request that reaches
    no boundary in time (queued, in a long prefill) is interrupted and ends with one
    :class:`StreamFailed` (:class:`ShuttingDown`) as well.
    """
    task = shutdown.register()
    started = False
    try:
        try:
            event = await first
            while event is not None:
                started = True
                # Logged before the yield: the renderer stops pulling once the failure is out.
                if isinstance(event, StreamFailed) and isinstance(event.error, ShuttingDown):
                    log.info("request %s: stopped by the server's shutdown (grace period over)", request_id)
                yield event
                if isinstance(event, StreamFailed):
                    return
                event = await anext(rest, None)
        except asyncio.CancelledError as exc:
            if not shutdown.interrupted(exc):
                raise
            log.info(
                "request %s: stopped by the server's shutdown (grace period over, %s)",
                request_id,
                "mid-step" if started else "before generating",
            )
            yield StreamFailed(ShuttingDown(), before_output=False)
    finally:
        shutdown.unregister(task)
        if not first.done():
            first.cancel()
            with contextlib.suppress(BaseException):
                await first
        await rest.aclose()
