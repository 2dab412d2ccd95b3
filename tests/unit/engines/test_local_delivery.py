"""The inference thread's events reach consumers with one event-loop wake-up per step, in order."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from qwen_gateway.engines.base import Finished, TextDelta
from qwen_gateway.engines.local.delivery import Deliveries
from tests.unit.engines.local_helpers import QWEN25, request, run


class WakeCounter:
    """Counts ``call_soon_threadsafe`` calls on one real event loop, per calling thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.calls: dict[str, int] = {}
        original = loop.call_soon_threadsafe

        def counted(callback: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            name = threading.current_thread().name
            self.calls[name] = self.calls.get(name, 0) + 1
            return original(callback, *args, **kwargs)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]


def test_posts_of_the_owning_thread_go_out_together_at_flush_in_order() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        wakes = WakeCounter(loop)
        first: asyncio.Queue[int] = asyncio.Queue()
        second: asyncio.Queue[int] = asyncio.Queue()
        deliveries = Deliveries()
        posted = threading.Event()

        def inference_thread() -> None:
            deliveries.bind()
            for i in range(3):
                deliveries.post(loop, first.put_nowait, i, lambda: None)
                deliveries.post(loop, second.put_nowait, 10 + i, lambda: None)
            posted.set()
            deliveries.flush()

        thread = threading.Thread(target=inference_thread, name="owner")
        thread.start()
        await asyncio.to_thread(posted.wait)
        assert [await first.get() for _ in range(3)] == [0, 1, 2]
        assert [await second.get() for _ in range(3)] == [10, 11, 12]
        thread.join()
        assert wakes.calls.get("owner") == 1  # six events, one wake-up

    run(main())


def test_posts_from_another_thread_go_out_at_once() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str] = asyncio.Queue()
        deliveries = Deliveries()
        bound, done = threading.Event(), threading.Event()

        def owner() -> None:  # stays alive (its ident taken) until the post has arrived
            deliveries.bind()
            bound.set()
            done.wait(600)

        thread = threading.Thread(target=owner)
        thread.start()
        await asyncio.to_thread(bound.wait, 600)
        # Never flushed: an event posted outside the owning thread must not wait for a flush.
        await asyncio.to_thread(deliveries.post, loop, queue.put_nowait, "now", lambda: None)
        assert await asyncio.wait_for(queue.get(), 600) == "now"
        done.set()
        thread.join()

    run(main())


def test_after_unbind_posts_go_out_at_once_from_any_thread() -> None:
    """A thread started after the inference thread ended may reuse its ident: unbind (the
    scheduler's last act) sends what is held and stops holding."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str] = asyncio.Queue()
        deliveries = Deliveries()

        def owner() -> None:
            deliveries.bind()
            deliveries.post(loop, queue.put_nowait, "held", lambda: None)
            deliveries.unbind()
            deliveries.post(loop, queue.put_nowait, "after", lambda: None)

        await asyncio.to_thread(owner)
        assert [await asyncio.wait_for(queue.get(), 600) for _ in range(2)] == ["held", "after"]

    run(main())


def test_a_closed_loop_calls_on_closed_instead() -> None:
    loop = asyncio.new_event_loop()
    loop.close()
    closed: list[str] = []
    delivered: list[int] = []
    deliveries = Deliveries()

    def owner() -> None:
        deliveries.bind()
        deliveries.post(loop, delivered.append, 1, lambda: closed.append("flushed"))
        deliveries.flush()

    thread = threading.Thread(target=owner)
    thread.start()
    thread.join()
    deliveries.post(loop, delivered.append, 2, lambda: closed.append("direct"))
    assert closed == ["flushed", "direct"] and delivered == []


def test_a_batch_of_streams_wakes_the_loop_once_per_step(engine_factory: Callable[..., Any]) -> None:
    """Four streams decoding together: the inference thread wakes their shared loop at most once
    per step (the per-token wake-ups it replaced would be one per token)."""
    engine = engine_factory(QWEN25, id="tiny-delivery", max_batch_size=4)
    backend = engine._scheduler._backend
    steps: list[int] = []
    original = backend.step

    def counted_step(*args: Any, **kwargs: Any) -> Any:
        steps.append(1)
        return original(*args, **kwargs)

    backend.step = counted_step

    async def main() -> tuple[int, dict[str, int]]:
        wakes = WakeCounter(asyncio.get_running_loop())

        async def one(seed: int) -> int:
            deltas = 0
            async for event in engine.generate(request(max_tokens=24, seed=seed, temperature=1.0)):
                deltas += isinstance(event, TextDelta)
                if isinstance(event, Finished):
                    assert event.usage.completion_tokens == 24
            return deltas

        counts = await asyncio.gather(*(one(seed) for seed in range(4)))
        return sum(counts), wakes.calls

    try:
        deltas, calls = run(main())
    finally:
        del backend.step
    thread = engine._scheduler._thread.name
    # 96 tokens came out; each step sent its rows' events with one wake-up.
    assert calls.get(thread, 0) <= len(steps) < 96
    assert deltas > 0
