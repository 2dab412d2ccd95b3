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


def test_retry_after_is_the_soonest_end_of_an_open_breaker() -> None:
    clock = Clock()
    replicas = ReplicaSet(["a", "b"], failures_to_open=1, cooldown=30, clock=clock)
    a, b = replicas.replicas
    replicas.failed(a)
    clock.now += 10
    replicas.failed(b)  # open until 130, a until 130 - 10
    assert replicas.pick(set()) is None and not replicas.reachable
    assert replicas.retry_after() == 20
    clock.now += 19.5
    assert replicas.retry_after() == 1  # never 0: "now" is rounded up to a second
    clock.now += 1  # a's cool-down over: half-open, its trial request goes
    assert replicas.pick(set()) is a and replicas.reachable
    # Its trial under way, nothing takes a request, but the trial may end it at once.
    assert replicas.pick(set()) is None and replicas.retry_after() == 1


def test_reachable_follows_the_breakers_not_one_failure() -> None:
    clock = Clock()
    replicas = ReplicaSet(["a"], failures_to_open=3, cooldown=10, clock=clock)
    a = replicas.replicas[0]
    replicas.failed(a)
    replicas.failed(a)
    assert replicas.reachable and not a.healthy  # passed over when others are there, still served
    replicas.failed(a)
    assert not replicas.reachable
    replicas.succeeded(a)
    # An active check that fails opens it until the next check; one that passes lets a trial through.
    replicas.check_failed(a, 5)
    assert not replicas.reachable and replicas.retry_after() == 5
    replicas.check_passed(a)
    assert replicas.reachable and replicas.pick(set()) is a and replicas.pick(set()) is None


def test_a_failed_check_counts_until_the_next_check_not_only_for_the_breakers_hold() -> None:
    """The breaker's hold after a failed check ends after health_interval, but the next check starts
    only then and takes up to its timeouts: an upstream that never answers stays unreachable between
    the two checks (it read as reachable for ~2 s of every 7), until a check or a request passes."""
    clock = Clock()
    replicas = ReplicaSet(["a"], failures_to_open=3, cooldown=10, clock=clock)
    a = replicas.replicas[0]
    replicas.check_failed(a, 5)
    clock.now += 6  # the hold is over; the next check is still waiting for its answer
    assert not replicas.reachable
    assert replicas.pick(set()) is a  # the half-open trial may still go: it is how a request finds out
    replicas.failed(a)
    assert not replicas.reachable
    replicas.check_passed(a)
    assert replicas.reachable
    replicas.check_failed(a, 5)
    clock.now += 6
    replicas.succeeded(a)  # a trial request was answered: it is up
    assert replicas.reachable
