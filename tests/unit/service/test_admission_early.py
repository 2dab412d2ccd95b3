"""The early capacity check routes make before validating (Admission.refuse_if_full): it refuses only
what Admission.acquire would refuse too, whatever the body's ``n`` holds."""

from __future__ import annotations

from typing import Any

import pytest

from qwen_gateway.errors import EngineOverloaded
from qwen_gateway.service.admission import Admission


def test_it_refuses_exactly_when_acquire_would() -> None:
    admission = Admission(running=2, queue=1)
    admission.refuse_if_full()  # room for 3
    tickets = [admission.acquire(), admission.acquire()]
    admission.refuse_if_full(1)
    with pytest.raises(EngineOverloaded):
        admission.refuse_if_full(2)  # 2 more don't fit, as acquire(2) says
    with pytest.raises(EngineOverloaded):
        admission.acquire(2)
    tickets.append(admission.acquire())
    with pytest.raises(EngineOverloaded) as refused:
        admission.refuse_if_full()
    assert refused.value.status == 503 and refused.value.headers == {"Retry-After": "1"}
    for ticket in tickets:
        ticket.release()
    admission.refuse_if_full(3)


@pytest.mark.parametrize("n", [None, 0, -1, 5, 2.5, "2", True, [2]])
def test_an_n_validation_would_refuse_counts_as_one(n: Any) -> None:
    """The 400 for a bad ``n`` comes later; here it must not turn into a 503 while there is room."""
    admission = Admission(running=1, queue=0)
    admission.refuse_if_full(n)
    ticket = admission.acquire()
    with pytest.raises(EngineOverloaded):
        admission.refuse_if_full(n)
    ticket.release()
