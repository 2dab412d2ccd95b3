"""The shutdown coordinator: how running requests learn that the server is stopping.

The server (``qwen_gateway/server.py``) stops accepting, lets running requests finish for the grace
period, then calls :meth:`Shutdown.expire`. A stream waiting for its next chunk then ends itself: the
engine stream is closed (so the ledger row is written with the tokens really used), an in-band error
event and ``[DONE]`` go out, and one log line says so. A non-stream call answers 503 instead.
"""

from __future__ import annotations

import asyncio


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
