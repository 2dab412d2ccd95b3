"""Replica choice and the circuit breaker, on a clock the test moves."""

from __future__ import annotations

from qwen_gateway.engines.openai.replicas import ReplicaSet


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_least_outstanding_requests_wins() -> None:
    replicas = ReplicaSet(["a", "b", "c"], failures_to_open=3, cooldown=10, clock=Clock())
    replicas.replicas[0].outstanding = 2
    replicas.replicas[1].outstanding = 1
    replicas.replicas[2].outstanding = 3
    assert all(replicas.pick(set()).url == "b" for _ in range(5))  # type: ignore[union-attr]
    assert replicas.pick({"b"}).url == "a"  # type: ignore[union-attr]


def test_ties_rotate() -> None:
    replicas = ReplicaSet(["a", "b"], failures_to_open=3, cooldown=10, clock=Clock())
    assert {replicas.pick(set()).url for _ in range(4)} == {"a", "b"}  # type: ignore[union-attr]


def test_breaker_opens_cools_down_and_lets_one_trial_through() -> None:
    clock = Clock()
    replicas = ReplicaSet(["a", "b"], failures_to_open=2, cooldown=10, clock=clock)
    a = replicas.replicas[0]
    replicas.failed(a)
    replicas.failed(a)
    assert all(replicas.pick(set()).url == "b" for _ in range(4))  # type: ignore[union-attr]
    assert replicas.pick({"b"}) is None  # open: not even when it is the only one left
    clock.now += 10.5  # cool-down over: half-open
    assert replicas.pick({"b"}) is a
    assert replicas.pick({"b"}) is None  # one trial at a time
    replicas.succeeded(a)
    assert replicas.pick({"b"}) is a and replicas.pick({"b"}) is a  # closed again


def test_a_failed_trial_reopens() -> None:
    clock = Clock()
    replicas = ReplicaSet(["a"], failures_to_open=1, cooldown=5, clock=clock)
    a = replicas.replicas[0]
    replicas.failed(a)
    clock.now += 6
    assert replicas.pick(set()) is a
    replicas.failed(a)
    assert replicas.pick(set()) is None and not replicas.any_available
