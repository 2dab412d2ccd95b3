"""The meter's background sweep for dead server processes runs every ``sweep_seconds`` (the setting),
not only at startup: on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from sqlalchemy import Connection, select

from qwen_gateway.service.ledger import LedgerWriter
from qwen_gateway.service.money.meter import SWEEP_SECONDS, Meter
from qwen_gateway.settings import Settings
from qwen_gateway.store import money
from qwen_gateway.store.db import Store
from qwen_gateway.store.tables import gateway_instances


def _instances(conn: Connection) -> set[str]:
    return set(conn.execute(select(gateway_instances.c.id)).scalars())


def test_a_process_that_dies_after_startup_is_swept_within_sweep_seconds(db_url: str) -> None:
    async def main() -> tuple[set[str], set[str]]:
        async with await Store.open(db_url) as store:
            writer = LedgerWriter(store)
            meter = Meter(writer, {}, sweep_seconds=1.0)
            await meter.start()  # its startup sweep has run: the dead process below comes after it
            try:
                # Another host's process whose last heartbeat is a day old: dead whatever its pid.
                old = money.utcnow() - timedelta(days=1)
                await writer.run(
                    lambda conn: money.register_instance(
                        conn, instance_id="gw_dead", hostname="elsewhere.invalid", pid=1, now=old
                    )
                )
                before = await writer.run(_instances)
                # The bound is for a hung loop (20x the interval), below the default's 30 s.
                deadline = asyncio.get_running_loop().time() + 20
                while "gw_dead" in (after := await writer.run(_instances)):
                    assert asyncio.get_running_loop().time() < deadline, "no sweep within 20 s"
                    await asyncio.sleep(0.05)
                return before, after
            finally:
                await meter.aclose()
                await writer.aclose()

    before, after = asyncio.run(main())
    assert "gw_dead" in before and "gw_dead" not in after
    assert len(after) == 1  # the meter's own process, still registered


def test_sweep_seconds_is_a_setting_with_the_documented_default_and_floor() -> None:
    assert Settings().sweep_seconds == SWEEP_SECONDS == 30.0
    assert Settings(sweep_seconds=1).sweep_seconds == 1.0
    try:
        Settings(sweep_seconds=0.5)
    except ValueError as exc:
        assert "sweep_seconds" in str(exc)
    else:
        raise AssertionError("sweep_seconds below 1 was accepted")
