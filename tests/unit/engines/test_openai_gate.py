"""The openai engine's gate: at most ``limit`` holders, the rest served first come, first served; a
waiter cancelled (its client gone) leaves at once, and one cancelled just as it was handed the slot
passes it on. Driven on one event loop, step by step (no timing)."""

from __future__ import annotations

import asyncio

import pytest

from qwen_gateway.engines.openai.gate import Gate


async def _settle() -> None:
    for _ in range(5):  # let every ready task run up to its next wait
        await asyncio.sleep(0)


def test_waiters_are_served_in_order_and_the_limit_holds() -> None:
    async def main() -> None:
        gate = Gate(2)
        order: list[int] = []

        async def holder(i: int, done: asyncio.Event) -> None:
            await gate.acquire()
            order.append(i)
            assert gate.in_use <= 2
            await done.wait()
            gate.release()

        events = [asyncio.Event() for _ in range(5)]
        tasks = [asyncio.create_task(holder(i, events[i])) for i in range(5)]
        await _settle()
        assert (order, gate.in_use, gate.waiting) == ([0, 1], 2, 3)
        for i in (1, 0, 2, 3, 4):
            events[i].set()
            await _settle()
        await asyncio.gather(*tasks)
        assert order == [0, 1, 2, 3, 4] and (gate.in_use, gate.waiting) == (0, 0)

    asyncio.run(main())


def test_a_cancelled_waiter_leaves_and_a_cancelled_heir_passes_the_slot_on() -> None:
    async def main() -> None:
        gate = Gate(1)
        await gate.acquire()
        first = asyncio.create_task(gate.acquire())
        second = asyncio.create_task(gate.acquire())
        third = asyncio.create_task(gate.acquire())
        await _settle()
        assert gate.waiting == 3
        first.cancel()  # a client gone while queued: out of the queue at once
        await _settle()
        assert gate.waiting == 2 and first.cancelled()
        gate.release()  # handed to `second`, which is cancelled before it could run
        second.cancel()
        await _settle()
        assert second.cancelled() and third.done() and not third.cancelled()
        assert (gate.in_use, gate.waiting) == (1, 0)  # third holds the one slot
        gate.release()
        assert gate.in_use == 0

    asyncio.run(main())


def test_a_gate_needs_a_slot() -> None:
    with pytest.raises(ValueError):
        Gate(0)
