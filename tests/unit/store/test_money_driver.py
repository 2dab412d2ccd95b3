"""The money statements on the driver's cursor (store/driver.py), as the ledger writer runs them: on its
own synchronous connection (``Store.threaded()``), SQLite and PostgreSQL. What they write must read
back through SQLAlchemy exactly as what SQLAlchemy writes (datetimes included), and move money as the
Core statements do."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import Connection, select

from qwen_gateway.store import driver, money
from qwen_gateway.store.db import Store
from qwen_gateway.store.tables import holds, usage_ledger
from tests.unit.store.conftest import StoreRunner
from tests.unit.store.test_money import NOW, _admit, _key, _row, _state


async def _on_writer_connection(store: Store, fn: Any) -> Any:
    threaded = store.threaded()
    assert threaded is not None

    def in_transaction(conn: Connection) -> Any:
        assert driver.supported(conn)  # the writer's connection takes the driver path
        with conn.begin():
            return fn(conn)

    try:
        return await threaded.run(in_transaction)
    finally:
        await threaded.aclose()


def test_hold_and_settle_on_the_driver_cursor_match_the_core_statements(with_store: StoreRunner) -> None:
    async def body(store: Store) -> None:
        key_id = await _key(store, 1000)
        admitted = await _on_writer_connection(store, _admit(key_id, "r1", 300))
        assert admitted == money.Admitted(700, 300, None)
        # Not enough left: refused, nothing moved (the slow path decides, as before).
        refused = await _on_writer_connection(store, _admit(key_id, "r2", 701))
        assert isinstance(refused, money.Refused) and refused.reason == "balance"

        def read(conn: Connection) -> Any:
            hold = conn.execute(select(holds).where(holds.c.request_id == "r1")).one()
            return hold.created_at, _state(conn, key_id)

        async with store.connect() as conn:
            created, state = await conn.run_sync(read)
        assert created == NOW and state == (700, 300, 0)

        balances = await _on_writer_connection(
            store, lambda conn: money.settle(conn, rows=[_row(key_id, "r1", 120, 300, created_at=NOW)])
        )
        assert balances == [880]

        def after(conn: Connection) -> Any:
            row = conn.execute(select(usage_ledger).where(usage_ledger.c.request_id == "r1")).one()
            return row.created_at, row.total_tokens, row.cost_micro, _state(conn, key_id)

        async with store.connect() as conn:
            assert await conn.run_sync(after) == (NOW, 7, 120, (880, 0, 120))

    with_store(body)


def test_a_hold_written_on_the_driver_cursor_is_released_when_it_outlives_the_bound(
    with_store: StoreRunner,
) -> None:
    # The release compares created_at with a bound: the driver's datetime form must sort as SQLAlchemy's.
    async def body(store: Store) -> None:
        key_id = await _key(store, 1000)
        await _on_writer_connection(store, _admit(key_id, "old", 100, now=NOW - timedelta(hours=2)))
        await _on_writer_connection(store, _admit(key_id, "new", 100, now=NOW))

        def release(conn: Connection) -> list[money.Released]:
            return money.release_stale_holds(
                conn,
                me="me",
                hostname="h",
                pid_alive=lambda pid: True,
                now=NOW,
                stale_after=timedelta(minutes=1),
                max_age=timedelta(hours=1),
            )

        released = await _on_writer_connection(store, release)
        assert [r.request_id for r in released] == ["old"]

    with_store(body)
