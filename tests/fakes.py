"""Named fakes, used only to inject faults that a real engine cannot produce on demand."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

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


class FaultyEngine:
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

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(max_context=1024)

    async def start(self) -> None:
        return None

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

    async def health(self) -> EngineHealth:
        return EngineHealth(EngineState.READY, self.active)

    async def aclose(self) -> None:
        return None
