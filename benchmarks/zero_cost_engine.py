"""BENCHMARK FAKE: an engine that costs nothing, so what a benchmark measures is the gateway alone.

Select it in a ``[[models]]`` entry with ``engine = "zero_cost_engine:ZeroCostEngine"`` while
``benchmarks/`` is on ``PYTHONPATH`` (``benchmarks/bench_overhead.py`` does both). Every request gets
the same answer at once: 20 one-token text deltas, then ``Finished`` with 7 prompt and 20 completion
tokens. It never looks at the prompt, so it must never serve real traffic.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from qwen_gateway.settings import ModelConfig, Settings

PROMPT_TOKENS = 7
CHUNKS = 20
# Built once: the point is that producing the answer costs the engine nothing measurable.
_DELTAS = tuple(
    TextDelta(f"t{i} ", usage=Usage(prompt_tokens=PROMPT_TOKENS, completion_tokens=i + 1))
    for i in range(CHUNKS)
)
_FINISHED = Finished("stop", Usage(prompt_tokens=PROMPT_TOKENS, completion_tokens=CHUNKS))


class ZeroCostEngine:
    """BENCHMARK FAKE engine: yields 20 one-token chunks instantly and reports usage 7/20
    (fewer chunks, finish reason "length", when ``max_tokens`` is below 20)."""

    name = "zero-cost-benchmark-fake"

    def __init__(self, config: ModelConfig, *, settings: Settings | None = None) -> None:
        self._config = config
        self._active = 0
        self._closed = False

    @property
    def capabilities(self) -> Capabilities:
        # Large enough that admission control never queues: the benchmark measures the gateway.
        return Capabilities(max_context=32_768, max_output=8_192, max_concurrency=1024)

    async def start(self) -> None:
        return None

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        self._active += 1
        try:
            limit = request.sampling.max_tokens
            if limit >= CHUNKS:
                for delta in _DELTAS:
                    yield delta
                yield _FINISHED
                return
            # A smaller max_tokens is honoured (never accepted and ignored), ending with "length".
            for delta in _DELTAS[:limit]:
                yield delta
            yield Finished("length", Usage(prompt_tokens=PROMPT_TOKENS, completion_tokens=limit))
        finally:
            self._active -= 1

    async def cancelled_usage(self, request_id: str) -> Usage | None:
        return None  # nothing is generated ahead of what the consumer reads

    async def health(self) -> EngineHealth:
        state = EngineState.CLOSED if self._closed else EngineState.READY
        return EngineHealth(state, self._active)

    async def aclose(self) -> None:
        self._closed = True
