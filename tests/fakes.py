"""Named fakes, used only to inject faults that a real engine cannot produce on demand."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

from qwen_gateway.engines.base import (
    Capabilities,
    EngineHealth,
    EngineState,
    Finished,
    GenerationEvent,
    GenerationRequest,
    TextDelta,
    Usage,
)
from qwen_gateway.errors import EngineFailure


class _FakeEngineBase:
    """What the named fake engines below share: a small context, nothing to start or close, every
    event delivered (so the last usage seen is the count), READY with their ``active`` count."""

    active: int

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(max_context=1024)

    async def start(self) -> None:
        return None

    async def cancelled_usage(self, request_id: str) -> Usage | None:
        return None  # every event it makes is delivered: the last usage seen is the count

    async def health(self) -> EngineHealth:
        return EngineHealth(EngineState.READY, self.active)

    async def aclose(self) -> None:
        return None


class FaultyEngine(_FakeEngineBase):
    """FAKE engine: after ``delay`` seconds yields ``good_deltas`` text deltas, then fails as a broken
    engine would.

    With ``fail=False`` it finishes normally, which lets a test compare the two paths.
    """

    name = "faulty-fake"

    def __init__(self, good_deltas: int = 3, fail: bool = True, delay: float = 0.0) -> None:
        self.good_deltas = good_deltas
        self.fail = fail
        self.delay = delay  # seconds of "prefill" before the first event
        self.active = 0

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        self.active += 1
        try:
            await asyncio.sleep(self.delay)
            for i in range(self.good_deltas):
                yield TextDelta(f"tok{i} ", usage=Usage(prompt_tokens=7, completion_tokens=i + 1))
            if self.fail:
                raise EngineFailure()
            yield Finished("stop", Usage(prompt_tokens=7, completion_tokens=self.good_deltas))
        finally:
            self.active -= 1


class GatedEngine(_FakeEngineBase):
    """FAKE engine: yields its first text delta at once, then one more each time the test calls
    :meth:`release` (from any thread), and finishes after ``deltas``.

    A real engine can't be held between two tokens on demand; this one lets a test see each frame
    arrive before the next token even exists.
    """

    name = "gated-fake"

    def __init__(self, deltas: int = 3) -> None:
        self.deltas = deltas
        self.active = 0
        self._gate: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def release(self) -> None:
        """Let the next delta out (call once the stream has started: after its first frame arrived)."""
        assert self._loop is not None and self._gate is not None, "no stream has started"
        self._loop.call_soon_threadsafe(self._gate.release)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        self._loop = asyncio.get_running_loop()
        self._gate = asyncio.Semaphore(0)
        self.active += 1
        try:
            for i in range(self.deltas):
                if i:
                    await self._gate.acquire()
                yield TextDelta(f"tok{i} ", usage=Usage(prompt_tokens=7, completion_tokens=i + 1))
            yield Finished("stop", Usage(prompt_tokens=7, completion_tokens=self.deltas))
        finally:
            self.active -= 1


class ScriptedDNS:
    """FAKE name resolver (installed as a running loop's ``getaddrinfo``): answers the names in
    ``script`` with the next address list on each lookup, as a rebinding DNS server would; IP literals
    and other names go to the real resolver. ``lookups`` counts the scripted lookups per name.

    A test can't make real DNS answer differently on the second lookup, hence the fake."""

    def __init__(self, loop: asyncio.AbstractEventLoop, script: dict[str, list[list[str]]]) -> None:
        self._real = loop.getaddrinfo
        self._script = {name: list(answers) for name, answers in script.items()}
        self.lookups: dict[str, int] = {}
        loop.getaddrinfo = self  # type: ignore[method-assign]

    async def __call__(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name not in self._script:
            return await self._real(host, port, *args, **kwargs)
        self.lookups[name] = self.lookups.get(name, 0) + 1
        answers = self._script[name]
        addresses = answers.pop(0) if len(answers) > 1 else answers[0]
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, int(port or 0)))
            for a in addresses
        ]
