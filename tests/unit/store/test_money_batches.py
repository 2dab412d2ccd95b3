"""Admissions and settlements handed over together (the ledger writer's batch: store/money.admit_many and
settle of many rows), on SQLite and PostgreSQL, on the writer's own connection (the driver's cursor) and
through ``run_sync`` (``exec_driver_sql``). A batch must decide exactly what the same requests one by
one in the same order would: each sees the ones before it."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Connection, select

from qwen_gateway.store import money
from qwen_gateway.store.db import Store
from qwen_gateway.store.keys import insert_key
from qwen_gateway.store.tables import usage_ledger
from tests.unit.store.conftest import StoreRunner
from tests.unit.store.test_money import NOW, _row, _run, _state
from tests.unit.store.test_money_driver import _on_writer_connection

Runner = Callable[[Store, Any], Any]
PATHS = {"driver-cursor": _on_writer_connection, "exec_driver_sql": _run}


async def _key(store: Store, balance: int | None, **limits: Any) -> str:
    # A name and hash of its own: a test here makes several keys.
    tag = secrets.token_hex(8)
    row = await insert_key(
        store=store,
        name=f"k-{tag}",
        prefix="sk-x",
        key_hash=tag.ljust(64, "0"),
        balance_micro=balance,
        **limits,
    )
    return row.id


def _hold(key_id: str, request_id: str, hold: int, *, tokens: int = 10, **kw: Any) -> money.HoldRequest:
    return money.HoldRequest(
        key_id=key_id,
        request_id=request_id,
        model="m",
        owner="me",
        now=kw.pop("now", NOW),
        hold_micro=hold,
        tokens=tokens,
        **kw,
    )


@pytest.fixture(params=sorted(PATHS))
def on(request: pytest.FixtureRequest) -> Runner:
    runner: Runner = PATHS[request.param]
    return runner


def test_holds_of_one_key_in_one_batch_see_each_other(with_store: StoreRunner, on: Runner) -> None:
    async def body(store: Store) -> tuple[Any, ...]:
        key = await _key(store, 1000)
        other = await _key(store, 50)
        batch = [
            _hold(key, "a", 300),
            _hold(other, "x", 60),  # another key's refusal changes nothing for the first key
            _hold(key, "b", 300),
            _hold(key, "c", 500),  # 400 left: refused
            _hold(key, "d", 400),  # still 400 left: admitted
        ]
        out = await on(store, lambda c: money.admit_many(c, batch))
        return out, await _run(store, lambda c: (_state(c, key), _state(c, other)))

    out, (state, other_state) = with_store(body)
    assert out == [
        money.Admitted(700, 300, None),
        money.Refused("balance", 50),
        money.Admitted(400, 300, None),
        money.Refused("balance", 400),
        money.Admitted(0, 400, None),
    ]
    assert state == (0, 1000, 0)  # balance + holds + spent == 1000
    assert other_state == (50, 0, 0)


def test_the_whole_batch_fits_in_one_statement(with_store: StoreRunner, on: Runner) -> None:
    async def body(store: Store) -> tuple[Any, ...]:
        key = await _key(store, 1000)
        out = await on(store, lambda c: money.admit_many(c, [_hold(key, f"r{i}", 100) for i in range(4)]))
        return out, await _run(store, lambda c: _state(c, key))

    out, state = with_store(body)
    assert out == [money.Admitted(1000 - 100 * (i + 1), 100, None) for i in range(4)]
    assert state == (600, 400, 0)


def test_rpm_counts_the_requests_earlier_in_the_batch(with_store: StoreRunner, on: Runner) -> None:
    async def body(store: Store) -> tuple[Any, ...]:
        key = await _key(store, 1000, rpm_limit=3)
        batch = [_hold(key, f"r{i}", 100, limited_hint=True) for i in range(5)]
        # Seconds later, in the same batch: the window still holds the three.
        batch.append(_hold(key, "late", 100, limited_hint=True, now=NOW + timedelta(seconds=2)))
        out = await on(store, lambda c: money.admit_many(c, batch))
        # The next batch, a minute on: the window has slid past them.
        later = await on(
            store,
            lambda c: money.admit_many(
                c, [_hold(key, "next", 100, limited_hint=True, now=NOW + timedelta(seconds=61))]
            ),
        )
        return out, later, await _run(store, lambda c: _state(c, key))

    out, later, state = with_store(body)
    second = int(NOW.timestamp())
    assert out[:3] == [money.Admitted(900 - 100 * i, 100, second) for i in range(3)]
    assert out[3:] == [
        money.Refused("rpm", 700, 60),
        money.Refused("rpm", 700, 60),
        money.Refused("rpm", 700, 58),
    ]
    assert later == [money.Admitted(600, 100, second + 61)]
    assert state == (600, 400, 0)


def test_tpm_counts_estimates_earlier_in_the_batch(with_store: StoreRunner, on: Runner) -> None:
    async def body(store: Store) -> Any:
        key = await _key(store, None, tpm_limit=25)
        batch = [_hold(key, f"r{i}", 0, tokens=10, limited_hint=True) for i in range(3)]
        return await on(store, lambda c: money.admit_many(c, batch))

    first, second, third = with_store(body)
    assert isinstance(first, money.Admitted) and isinstance(second, money.Admitted)
    assert third == money.Refused("tpm", None, 60)


def test_a_stale_hint_still_finds_the_limits(with_store: StoreRunner, on: Runner) -> None:
    """A key given limits after its row was cached is admitted as limited all the same."""

    async def body(store: Store) -> Any:
        key = await _key(store, 1000, rpm_limit=1)
        return await on(store, lambda c: money.admit_many(c, [_hold(key, "a", 1), _hold(key, "b", 1)]))

    first, second = with_store(body)
    assert first == money.Admitted(999, 1, int(NOW.timestamp()))
    assert isinstance(second, money.Refused) and second.reason == "rpm"


def test_settling_many_rows_of_one_key(with_store: StoreRunner, on: Runner) -> None:
    async def body(store: Store) -> tuple[Any, ...]:
        key = await _key(store, 1000)
        other = await _key(store, 500)
        await on(
            store,
            lambda c: money.admit_many(
                c, [_hold(key, "a", 300), _hold(key, "b", 300), _hold(other, "x", 100), _hold(key, "c", 100)]
            ),
        )
        rows = [
            _row(key, "a", 120, 300),
            _row(other, "x", 100, 100),
            _row(key, "b", 0, 300),  # failed before its first token: free
            _row(key, "plain", 0, None),  # no hold: no money moves
            _row(key, "c", 100, 100),
        ]
        settled = await on(store, lambda c: money.settle(c, rows=rows))
        return settled, await _run(store, lambda c: (_state(c, key), _state(c, other)))

    settled, (state, other_state) = with_store(body)
    # 300 left after the three holds: each row's balance after its own charge, in order.
    assert settled == [480, 400, 780, None, 780]
    assert state == (780, 0, 220)
    assert other_state == (400, 0, 100)


def test_rows_costing_more_than_is_left_are_charged_in_order(with_store: StoreRunner, on: Runner) -> None:
    async def body(store: Store) -> tuple[Any, ...]:
        key = await _key(store, 300)
        await on(store, lambda c: money.admit_many(c, [_hold(key, "a", 100), _hold(key, "b", 100)]))
        # Each estimate was low (it can't be with the byte bound; settlement must not trust it): 100 is
        # left besides the holds, so "a" (150) is charged in full and "b" (250) what remains.
        settled = await on(
            store, lambda c: money.settle(c, rows=[_row(key, "a", 150, 100), _row(key, "b", 250, 100)])
        )

        def costs(conn: Connection) -> Any:
            return _state(conn, key)

        return settled, await _run(store, costs)

    settled, state = with_store(body)
    assert settled == [50, 0]
    assert state == (0, 0, 300)  # never below zero; the ledger sums to the balance change


def test_a_dead_processes_hold_is_ledgered_under_its_endpoint(with_store: StoreRunner, on: Runner) -> None:
    async def body(store: Store) -> Any:
        key = await _key(store, 1000)
        request = money.HoldRequest(
            key_id=key,
            request_id="native-1",
            model="m",
            owner="dead",
            now=NOW,
            hold_micro=100,
            tokens=10,
            endpoint="native.text-generation",
        )
        compat = dataclasses.replace(request, request_id="compat-1", endpoint="chat.completions")
        await on(store, lambda c: money.admit_many(c, [request, compat]))
        await _run(
            store,
            lambda c: money.release_stale_holds(
                c,
                me="me",
                hostname="h",
                pid_alive=lambda pid: True,
                now=NOW,
                stale_after=timedelta(seconds=60),
                max_age=timedelta(days=1),
            ),
        )
        rows = await _run(
            store,
            lambda c: [(r.request_id, r.endpoint, r.status) for r in c.execute(select(usage_ledger))],
        )
        return rows, await _run(store, lambda c: _state(c, key))

    rows, state = with_store(body)
    # Their owner never registered: dead. Each row names its request's endpoint.
    assert sorted(rows) == [
        ("compat-1", "chat.completions", "expired"),
        ("native-1", "native.text-generation", "expired"),
    ]
    assert state == (1000, 0, 0)


def test_a_later_rows_hold_does_not_pay_for_an_earlier_row(with_store: StoreRunner, on: Runner) -> None:
    """Charged together, rows end exactly as charged one by one: the first row, costing more than is
    held and left at its turn, takes what is left, even though a later row gives a hold back."""

    async def body(store: Store) -> tuple[Any, ...]:
        key = await _key(store, 700)
        await on(store, lambda c: money.admit_many(c, [_hold(key, "a", 0), _hold(key, "b", 600)]))
        rows = [_row(key, "a", 500, 0), _row(key, "b", 0, 600)]
        settled = await on(store, lambda c: money.settle(c, rows=rows))
        return settled, await _run(store, lambda c: _state(c, key))

    settled, state = with_store(body)
    assert settled == [0, 600]  # never a balance below zero, for the key or in an answer's header
    assert state == (600, 0, 100)
