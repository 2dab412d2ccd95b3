"""Helpers for the local engine's tests: the tiny checkpoints, a runner, request builders and
token-mask probes (masks are how the engine compiles per-request rules into the batch bitmask; tests
install their own by replacing ``LocalEngine._token_masks`` on one engine)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, TypeVar

from qwen_gateway.engines.base import (
    ChatMessage,
    Finished,
    GenerationEvent,
    GenerationRequest,
    SamplingParams,
    TextDelta,
)
from qwen_gateway.engines.registry import SharedLoads
from qwen_gateway.settings import ModelConfig, Settings

MODELS = Path(__file__).resolve().parents[3] / ".." / "shared" / "models"
QWEN25 = MODELS / "tiny-qwen2.5"
QWEN3 = MODELS / "tiny-qwen3"

T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


def make_engine(path: Path, tmp: Path, *, shared: SharedLoads | None = None, **config: Any) -> Any:
    """A local engine for ``path`` (not started); ``shared``: the SharedLoads it takes its tokenizers
    and grammar compiler from, as a server's [[models]] entries on one checkpoint do."""
    from qwen_gateway.engines.local import LocalEngine

    scheduler = config.pop("scheduler", None)
    cfg = ModelConfig(id=config.pop("id", "tiny"), path=str(path), **config)
    return LocalEngine(cfg, settings=Settings(home=tmp), scheduler=scheduler, shared=shared)


def request(
    text: str = "Tell me a story about the sea.",
    *,
    messages: tuple[ChatMessage, ...] | None = None,
    request_id: str = "req",
    **sampling: Any,
) -> GenerationRequest:
    sampling.setdefault("max_tokens", 16)
    thinking = sampling.pop("thinking", None)
    tools = sampling.pop("tools", ())
    return GenerationRequest(
        request_id=request_id,
        model="tiny",
        messages=messages or (ChatMessage("user", text),),
        sampling=SamplingParams(**sampling),
        tools=tools,
        thinking=thinking,
    )


async def collect(stream: AsyncIterator[GenerationEvent]) -> tuple[list[TextDelta], Finished]:
    deltas: list[TextDelta] = []
    async for event in stream:
        if isinstance(event, TextDelta):
            deltas.append(event)
        else:
            return deltas, event
    raise AssertionError("stream ended without Finished")


def text_of(deltas: list[TextDelta]) -> str:
    return "".join(d.text for d in deltas)


async def answer(engine: Any, req: GenerationRequest) -> tuple[str, Finished]:
    deltas, finished = await collect(engine.generate(req))
    return text_of(deltas), finished


def install_masks(engine: Any, factory: Any) -> None:
    """Give every request of ``engine`` the token masks ``factory(request)`` returns (test-only)."""
    engine._token_masks = factory


def remove_masks(engine: Any) -> None:
    engine.__dict__.pop("_token_masks", None)


class Recorder:
    """A token mask that restricts nothing and keeps the request's live list of generated ids, so
    after the answer it holds every generated id."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def allowed(self, generated: Any) -> Any:
        self.seen = generated
        return None


class Forcer:
    """A token mask that makes the model emit ``ids`` in order (then keeps forcing the last one)."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def allowed(self, generated: Any) -> Any:
        import torch

        return torch.tensor([self.ids[min(len(generated), len(self.ids) - 1)]])
