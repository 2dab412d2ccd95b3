"""The money SQL on a real (SQLite) store: holds, settlement, release of dead processes' holds,
roll-ups. Each invariant of store/money.py's docstring is checked directly."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Connection, select
from sqlalchemy.exc import IntegrityError

from qwen_gateway.store import money
from qwen_gateway.store.db import Store
from qwen_gateway.store.keys import insert_key
from qwen_gateway.store.rollup import roll_up, usage_report
from qwen_gateway.store.tables import api_keys, holds, usage_ledger
from qwen_gateway.store.usage import NewUsage
from tests.unit.store.conftest import StoreRunner

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


async def _key(store: Store, balance: int | None = 1000, **limits: Any) -> str:
    row = await insert_key(
        store=store,
        name=f"k{balance}{limits}",
        prefix="sk-x",
        key_hash=str(id(limits)).ljust(64, "0"),
        balance_micro=balance,
        **limits,
    )
    return row.id


async def _run(store: Store, fn: Any) -> Any:
    async with store.begin() as conn:
        return await conn.run_sync(fn)


def _admit(
    key_id: str, request_id: str, hold: int, *, tokens: int = 10, now: datetime = NOW, owner: str = "me"
) -> Any:
    return lambda conn: money.admit(
        conn,
        key_id=key_id,
        request_id=request_id,
        model="m",
        owner=owner,
        now=now,
        hold_micro=hold,
        tokens=tokens,
    )


def _row(key_id: str, request_id: str, cost: int, held: int | None, **kw: Any) -> NewUsage:
    return NewUsage(
        request_id=request_id,
        key_id=key_id,
        model="m",
        endpoint="chat.completions",
        prompt_tokens=3,
        completion_tokens=4,
        status="ok",
        cost_micro=cost,
        held_micro=held,
        **kw,
    )


def _state(conn: Connection, key_id: str) -> tuple[int, int, int]:
    balance = conn.execute(select(api_keys.c.balance_micro).where(api_keys.c.id == key_id)).scalar_one()
    held = sum(r.amount_micro for r in conn.execute(select(holds).where(holds.c.key_id == key_id)))
    spent = sum(
        r.cost_micro or 0 for r in conn.execute(select(usage_ledger).where(usage_ledger.c.key_id == key_id))
    )
    return balance, held, spent


def test_hold_then_settle_moves_money_once(with_store: StoreRunner) -> None:
    async def body(store: Store) -> list[Any]:
        key = await _key(store)
        out = [await _run(store, _admit(key, "r1", 600))]
        out.append(await _run(store, _admit(key, "r2", 600)))  # 400 left: refused, nothing moved
        out.append(await _run(store, lambda c: _state(c, key)))
        out.append(await _run(store, lambda c: money.settle(c, rows=[_row(key, "r1", 250, 600)])))
        out.append(await _run(store, lambda c: _state(c, key)))
        with pytest.raises(IntegrityError):  # settling r1 again fails as a whole
            await _run(store, lambda c: money.settle(c, rows=[_row(key, "r1", 250, 600)]))
        out.append(await _run(store, lambda c: _state(c, key)))
        return out

    admitted, refused, held, settled, after, again = with_store(body)
    assert admitted == money.Admitted(400, 600, None)
    assert refused == money.Refused("balance", 400)
    assert held == (400, 600, 0)
    assert settled == [750]
    assert after == again == (750, 0, 250)  # balance + holds + spent == 1000 throughout


def test_a_charge_never_takes_the_balance_below_zero(with_store: StoreRunner) -> None:
    async def body(store: Store) -> tuple[Any, Any]:
        key = await _key(store, balance=100)
        await _run(store, _admit(key, "r", 100))
        # The hold's estimate was low (it can't be with the byte bound, but settlement must not trust it).
        result = await _run(store, lambda c: money.settle(c, rows=[_row(key, "r", 500, 100)]))
        return result, await _run(store, lambda c: _state(c, key))

    result, state = with_store(body)
    assert result == [0]
    assert state == (0, 0, 100)  # charged what there was; the ledger says so


def test_rpm_and_tpm_windows(with_store: StoreRunner) -> None:
    async def body(store: Store) -> list[Any]:
        key = await _key(store, balance=None, rpm_limit=2, tpm_limit=25)
        out = [await _run(store, _admit(key, f"r{i}", 0, tokens=10)) for i in range(3)]
        # A request settled at fewer tokens frees TPM room; the window slides after 60 s.
        await _run(
            store,
            lambda c: money.settle(
                c, rows=[_row(key, "r0", 0, None, rate_second=out[0].rate_second, rate_tokens=10)]
            ),
        )
        out.append(await _run(store, _admit(key, "r3", 0, tokens=10, now=NOW + timedelta(seconds=30))))
        out.append(await _run(store, _admit(key, "r4", 0, tokens=10, now=NOW + timedelta(seconds=61))))
        return out

    first, second, third, within, later = with_store(body)
    assert isinstance(first, money.Admitted) and isinstance(second, money.Admitted)
    assert third == money.Refused("rpm", None, 60)
    assert within == money.Refused("rpm", None, 30)
    assert isinstance(later, money.Admitted)


def test_tpm_counts_running_requests_at_their_estimate(with_store: StoreRunner) -> None:
    async def body(store: Store) -> list[Any]:
        key = await _key(store, balance=None, tpm_limit=25)
        return [await _run(store, _admit(key, f"r{i}", 0, tokens=10)) for i in range(3)]

    first, second, third = with_store(body)
    assert isinstance(first, money.Admitted) and isinstance(second, money.Admitted)
    assert isinstance(third, money.Refused) and third.reason == "tpm"


def test_dead_processes_holds_are_released_as_expired(with_store: StoreRunner) -> None:
    async def body(store: Store) -> tuple[Any, ...]:
        key = await _key(store)
        for instance, pid in (("dead", 111), ("alive", 222), ("me", 333)):
            await _run(
                store,
                lambda c, i=instance, p=pid: money.register_instance(
                    c, instance_id=i, hostname="h", pid=p, now=NOW
                ),
            )
        await _run(store, _admit(key, "of-dead", 100, owner="dead"))
        await _run(store, _admit(key, "of-alive", 100, owner="alive"))
        await _run(store, _admit(key, "old", 100, owner="alive", now=NOW - timedelta(days=2)))
        released = await _run(
            store,
            lambda c: money.release_stale_holds(
                c,
                me="me",
                hostname="h",
                pid_alive=lambda pid: pid != 111,
                now=NOW,
                stale_after=timedelta(seconds=60),
                max_age=timedelta(days=1),
            ),
        )
        ledger = await _run(
            store, lambda c: [(r.request_id, r.status, r.cost_micro) for r in c.execute(select(usage_ledger))]
        )
        return released, ledger, await _run(store, lambda c: _state(c, key))

    released, ledger, state = with_store(body)
    assert {(r.request_id, r.dead_owner) for r in released} == {("of-dead", True), ("old", False)}
    assert ledger == [("of-dead", "expired", 0)]  # the too-old one gets no row: its owner may settle it
    assert state == (900, 100, 0)


def test_roll_up_keeps_reports_exact(with_store: StoreRunner) -> None:
    async def body(store: Store) -> tuple[Any, Any, int]:
        key = await _key(store, balance=None)
        rows = [
            _row(key, f"r{i}", 7 * i + 1, None, created_at=NOW - timedelta(days=i % 3, hours=i))
            for i in range(20)
        ]
        await _run(store, lambda c: money.settle(c, rows=rows))
        before = await _run(store, lambda c: usage_report(c))
        moved = await _run(store, lambda c: roll_up(c, before=NOW - timedelta(hours=12), limit=7))
        moved += await _run(store, lambda c: roll_up(c, before=NOW - timedelta(hours=12)))
        after = await _run(store, lambda c: usage_report(c))
        return before, after, moved

    before, after, moved = with_store(body)
    assert moved > 7
    assert [(t.day, t.model, t.requests, t.sums) for t in before] == [
        (t.day, t.model, t.requests, t.sums) for t in after
    ]
    assert sum(t.sums["cost_micro"] for t in after) == sum(7 * i + 1 for i in range(20))
