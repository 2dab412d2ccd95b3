"""Admission control: each engine runs a bounded number of sequences and queues a bounded number more.

A request past both bounds is refused at once, before it reaches the engine and before any charge, with
DashScope's capacity error (503 ``ModelServingError``) and a ``Retry-After``. Without this bound, five
times the engine's capacity would only mean ever longer queues (latency without limit) instead of a
fast, clear answer a client can back off from.

The counter lives on the event loop (one per served model) and is only touched there, so it needs no
lock; a request releases its slots when its stream is closed, which is also how a client that hangs up
while queued leaves the queue at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from qwen_gateway.errors import EngineOverloaded

# Seconds a refused client is told to wait: a queue of a few batches drains in about that time.
RETRY_AFTER_SECONDS = 1
# The largest ``n`` a request may ask for (service/validation.py refuses more).
MAX_N = 4


class Admission:
    """``running`` sequences at once in the engine, up to ``queue`` more waiting for a slot."""

    def __init__(self, *, running: int, queue: int) -> None:
        if running < 1 or queue < 0:
            raise ValueError("admission needs running >= 1 and queue >= 0")
        self.running = running
        self.queue = queue
        self._held = 0
        # Batch work among the held sequences, and when live traffic was last admitted or ended
        # (monotonic):
        # what the batch worker reads to give way to live requests.
        self.background_held = 0
        self.live_at = float("-inf")
        # Called on the event loop each time live traffic is admitted (the batch worker preempts its
        # lines running on this engine); a listener must not raise.
        self.on_live: list[Callable[[], None]] = []
        # Batch lines held back for this engine's live traffic (the worker counts them; a gauge).
        self.background_waiting = 0
        self._waiters: list[asyncio.Future[None]] = []

    @property
    def held(self) -> int:
        """Sequences admitted and not yet released (running or queued)."""
        return self._held

    @property
    def queued(self) -> int:
        """Admitted sequences waiting for one of the engine's running slots."""
        return max(0, self._held - self.running)

    @property
    def live_held(self) -> int:
        """Live (not batch) sequences admitted and not yet released."""
        return self._held - self.background_held

    def changed(self) -> asyncio.Future[None]:
        """A future resolved at the next admission or release here (or :meth:`wake`): what the batch
        worker awaits for room instead of looking again and again."""
        self._waiters = [w for w in self._waiters if not w.done()]
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        return waiter

    def wake(self) -> None:
        """Resolve the futures of :meth:`changed` (also called on every admission and release)."""
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def acquire(self, n: int = 1, *, background: bool = False) -> Ticket:
        """Admit ``n`` sequences (all of a request's choices, or none) or raise EngineOverloaded;
        ``background``: batch work (not live traffic)."""
        if self._held + n > self.running + self.queue:
            raise EngineOverloaded(retry_after=RETRY_AFTER_SECONDS)
        self._held += n
        if background:
            self.background_held += n
        else:
            self.live_at = time.monotonic()
            for listener in self.on_live:
                listener()
        self.wake()
        return Ticket(self, n, background)

    def refuse_if_full(self, n: object = 1) -> None:
        """Raise EngineOverloaded now if the request would be refused by :meth:`acquire` as things
        stand: the cheap check a route makes as soon as it knows the model, before validating the rest
        of the request (under a burst, each surplus request otherwise paid the whole validation, media
        and search before the refusal, on the one event loop every refusal queues behind). ``n`` is the
        body's raw ``n``: anything but a valid count counts as 1, the fewest sequences any valid request
        takes, so nothing is refused here that :meth:`acquire` would admit."""
        count = n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_N else 1
        if self._held + count > self.running + self.queue:
            raise EngineOverloaded(retry_after=RETRY_AFTER_SECONDS)

    def _release(self, n: int, background: bool) -> None:
        self._held -= n
        if background:
            self.background_held -= n
        else:
            # Live traffic is "recent" from its last admission or end: back-to-back live requests
            # leave no idle gap for batch work to start in.
            self.live_at = time.monotonic()
        self.wake()


class Ticket:
    """Slots held by one request; :meth:`release` is idempotent."""

    __slots__ = ("_admission", "_background", "_n")

    def __init__(self, admission: Admission, n: int, background: bool = False) -> None:
        self._admission: Admission | None = admission
        self._n = n
        self._background = background

    def release(self) -> None:
        admission, self._admission = self._admission, None
        if admission is not None:
            admission._release(self._n, self._background)
