"""Admission's live/background bookkeeping (what the batch worker reads to give way to live requests)."""

from __future__ import annotations

import asyncio
import math

import pytest

from qwen_gateway.errors import EngineOverloaded
from qwen_gateway.service.admission import Admission
from qwen_gateway.service.batches import _hold_off


def test_background_sequences_count_toward_capacity_but_not_as_live_traffic() -> None:
    admission = Admission(running=2, queue=1)
    assert math.isinf(admission.live_at)
    batch = admission.acquire(1, background=True)
    assert (admission.held, admission.background_held, admission.live_held) == (1, 1, 0)
    assert math.isinf(admission.live_at)  # batch work is not live traffic
    live = admission.acquire(2)
    assert (admission.held, admission.live_held) == (3, 2)
    assert not math.isinf(admission.live_at)
    with pytest.raises(EngineOverloaded):
        admission.acquire(1, background=True)
    batch.release()
    batch.release()  # idempotent
    assert (admission.held, admission.background_held, admission.live_held) == (2, 0, 2)
    live.release()
    assert admission.held == 0


def test_changed_resolves_at_the_next_admission_or_release_or_wake() -> None:
    async def scenario() -> None:
        admission = Admission(running=2, queue=0)
        first = admission.changed()
        assert not first.done()
        ticket = admission.acquire(1)
        assert first.done()
        second = admission.changed()
        ticket.release()
        assert second.done()
        third = admission.changed()
        admission.wake()
        assert third.done()
        # A waiter given up (a timeout cancels it) is dropped, never resolved.
        gone = admission.changed()
        gone.cancel()
        admission.changed()
        assert len(admission._waiters) == 1

    asyncio.run(scenario())


def test_batch_work_is_held_off_by_live_traffic_its_idle_window_and_the_kept_slot() -> None:
    admission = Admission(running=3, queue=1)
    assert _hold_off(admission, 2.0) == 0  # never any live traffic
    live = admission.acquire(1)
    assert math.isinf(_hold_off(admission, 0.0))  # a live request runs
    live.release()
    wait = _hold_off(admission, 60.0)
    assert 0 < wait <= 60.0  # its idle window, as a deadline, not a poll
    assert _hold_off(admission, 0.0) == 0
    batch = admission.acquire(1, background=True)
    assert _hold_off(admission, 0.0) == 0  # 2 of 3 slots taken then: one kept for live traffic
    admission.acquire(1, background=True)
    assert math.isinf(_hold_off(admission, 0.0))  # only the kept slot is left
    batch.release()
    assert _hold_off(admission, 0.0) == 0


def test_urgent_batch_work_ignores_live_traffic_but_not_the_kept_slot() -> None:
    admission = Admission(running=3, queue=1)
    live = admission.acquire(1)
    assert math.isinf(_hold_off(admission, 60.0))
    assert _hold_off(admission, 60.0, live_first=False) == 0
    admission.acquire(1, background=True)
    assert math.isinf(_hold_off(admission, 0.0, live_first=False))  # the last slot is kept
    live.release()
    assert _hold_off(admission, 60.0, live_first=False) == 0  # no idle window either
