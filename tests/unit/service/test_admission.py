"""Admission's live/background bookkeeping (what the batch worker reads to give way to live requests)."""

from __future__ import annotations

import math

import pytest

from qwen_gateway.errors import EngineOverloaded
from qwen_gateway.service.admission import Admission


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
