"""Replicas of one upstream model: least-outstanding-requests choice, a circuit breaker per replica and
the state the active health checks keep.

All of it is this process's view only (in-flight counts, recent failures): with several gateway
processes each balances its own requests, which is what least-outstanding balancing needs; nothing
here must agree across processes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from qwen_gateway.engines.openai.urls import endpoint, redact_url, scrub, secrets_in


@dataclass(slots=True)
class Replica:
    url: str
    index: int  # its position in the config (a metrics label: URLs may hold credentials)
    # The URL for logs and errors (credentials masked), the endpoints, and what scrub() removes.
    shown: str = field(init=False)
    chat_url: str = field(init=False)
    models_url: str = field(init=False)
    _secrets: tuple[str, ...] = field(init=False, repr=False)
    outstanding: int = 0
    failures: int = 0  # in a row
    open_until: float = 0.0  # breaker open (replica skipped) until this monotonic time
    trial: bool = False  # half-open: one request is testing the replica now
    healthy: bool = True  # the last active health check (or request) succeeded
    # The last active check (the start's probe, a health check) failed. Kept apart from the breaker,
    # whose hold after a failed check may end before the next check has run (the checks take time).
    check_failing: bool = False

    def __post_init__(self) -> None:
        self.shown = redact_url(self.url)
        self.chat_url = endpoint(self.url, "/chat/completions")
        self.models_url = endpoint(self.url, "/models")
        self._secrets = secrets_in(self.url)

    def scrub(self, text: str) -> str:
        """``text`` (an exception's message, which may quote the URL) without the URL's credentials."""
        return scrub(text, self._secrets)

    def reason(self, exc: BaseException) -> str:
        """Why a contact with this replica failed, for the log: the exception's text without the
        URL's credentials (its type when the text is empty, as a timeout's is)."""
        return self.scrub(str(exc) or type(exc).__name__)

    def available(self, now: float) -> bool:
        if self.open_until > now:
            return False
        # Cool-down over (half-open): one trial request at a time until one succeeds.
        return not (self.failures and self.trial)


class ReplicaSet:
    def __init__(
        self,
        urls: Iterable[str],
        *,
        failures_to_open: int,
        cooldown: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.replicas = [Replica(u, i) for i, u in enumerate(urls)]
        self._failures_to_open = failures_to_open
        self._cooldown = cooldown
        self._clock = clock
        self._turn = 0  # rotates ties, so equal replicas share the load

    def pick(self, exclude: set[str]) -> Replica | None:
        """The available replica with the fewest requests in flight (healthy ones first), or None."""
        now = self._clock()
        best: Replica | None = None
        count = len(self.replicas)
        self._turn = (self._turn + 1) % count
        for i in range(count):
            r = self.replicas[(self._turn + i) % count]
            if r.url in exclude or not r.available(now):
                continue
            if (
                best is None
                or (not best.healthy and r.healthy)
                or (best.healthy == r.healthy and r.outstanding < best.outstanding)
            ):
                best = r
        if best is not None and best.failures:
            best.trial = True
        return best

    def succeeded(self, replica: Replica) -> None:
        replica.check_failing = False  # it answered: up, whatever the last check found
        replica.failures = 0
        replica.trial = False
        replica.open_until = 0.0
        replica.healthy = True

    def failed(self, replica: Replica) -> None:
        replica.failures += 1
        replica.trial = False
        replica.healthy = False
        if replica.failures >= self._failures_to_open:
            replica.open_until = self._clock() + self._cooldown

    def check_failed(self, replica: Replica, hold: float) -> None:
        """An active check (the start's probe, a health check) failed: the replica is skipped (its
        breaker open) for ``hold`` seconds, until the next check, which may find it back."""
        replica.healthy = False
        replica.check_failing = True
        replica.failures = max(replica.failures, self._failures_to_open)
        replica.trial = False
        replica.open_until = self._clock() + hold

    def check_passed(self, replica: Replica) -> None:
        """An active check succeeded: a replica that was failing gets a trial request (half-open)
        rather than the full load at once."""
        replica.check_failing = False
        if not replica.healthy or replica.open_until:
            replica.healthy = True
            replica.open_until = 0.0  # failures stay, so one trial request goes

    @property
    def any_available(self) -> bool:
        now = self._clock()
        return any(r.available(now) for r in self.replicas)

    @property
    def reachable(self) -> bool:
        """Some replica passed its last active check and its breaker is not open (closed, or
        half-open: a trial may go or is going). Failed requests alone open a breaker only after
        ``breaker_failures`` in a row; a failed check counts until the next check passes."""
        now = self._clock()
        return any(r.open_until <= now and not r.check_failing for r in self.replicas)

    def retry_after(self) -> int:
        """Seconds until some replica takes a request again, by the breakers (what a 503 for "none
        available" tells the client, at least 1): the soonest end of an open breaker's cool-down; a
        half-open replica, whose trial request is running now, is usable as soon as that succeeds."""
        now = self._clock()
        # Not open (available, or half-open with its trial under way): 0.
        soonest = min((max(0.0, r.open_until - now) for r in self.replicas), default=0.0)
        return max(1, math.ceil(soonest))
