"""The bound on requests in flight upstream: at most ``max_concurrency`` at once per engine entry, the
rest waiting in arrival order.

The service's admission (``service/admission.py``) only counts: it lets ``max_concurrency + max_queue``
requests in and refuses the rest. A local engine queues the surplus in its own scheduler; an upstream
has none here, so without this gate every admitted request went upstream at once and the upstream saw
the queue as load. The bound is per entry, across its replicas (a request keeps its slot while it is
retried on another replica): ``max_concurrency`` is what one gateway process sends to the model, as
docs/sizing.md sizes it.

Lives on the engine's event loop only (no lock). A waiter that is cancelled (its client hung up) leaves
the queue at once; one cancelled just as a slot was handed to it passes the slot on.
"""

from __future__ import annotations

import asyncio
from collections import deque


class Gate:
    """``limit`` slots; :meth:`acquire` waits first in, first out."""

    __slots__ = ("_in_use", "_limit", "_waiters")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("a gate needs at least one slot")
        self._limit = limit
        self._in_use = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def in_use(self) -> int:
        """Slots held now (requests in flight upstream)."""
        return self._in_use

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot."""
        return len(self._waiters)

    async def acquire(self) -> None:
        # Nobody waiting and a slot free: taken without a future (the common, unsaturated case). A free
        # slot with waiters cannot happen (release hands it straight over), so arrivals never overtake.
        if self._in_use < self._limit and not self._waiters:
            self._in_use += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot as it was cancelled: the next in line gets it
            elif waiter in self._waiters:  # (a release may have dropped it already, being done)
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        """Give a slot back: straight to the first waiter if there is one (it stays in use)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._in_use -= 1
