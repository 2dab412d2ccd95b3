"""The ledger writer on a real SQLite store: batching, flushing on close, failures that stay contained."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy.exc import IntegrityError

from qwen_gateway.service.ledger import LedgerWriter
from qwen_gateway.store.db import Store
from qwen_gateway.store.keys import insert_key
from qwen_gateway.store.usage import NewUsage, list_usage

Body = Callable[[Store], Awaitable[Any]]


@pytest.fixture
def url(db_url: str) -> str:
    """A fresh database: SQLite (its batches go through the writer's thread) and PostgreSQL (async)."""
    return db_url


@pytest.fixture
def run(url: str) -> Callable[[Body], Any]:
    def runner(body: Body) -> Any:
        async def main() -> Any:
            async with await Store.open(url) as store:
                return await body(store)

        return asyncio.run(main())

    return runner


def row(request_id: str, key_id: str | None = None, completion: int = 20) -> NewUsage:
    return NewUsage(
        request_id=request_id,
        key_id=key_id,
        model="qwen-plus",
        endpoint="chat.completions",
        prompt_tokens=7,
        completion_tokens=completion,
        status="ok",
    )


def ids(rows: list[Any]) -> list[str]:
    return sorted(r.request_id for r in rows)


def test_rows_that_arrive_together_share_one_transaction(run: Callable[[Body], Any]) -> None:
    async def body(store: Store) -> tuple[int, list[Any]]:
        writer = LedgerWriter(store)
        await asyncio.gather(*(writer.record(row(f"r{i}")) for i in range(50)))
        batches = writer.batches
        await writer.aclose()
        return batches, await list_usage(store=store)

    batches, rows = run(body)
    assert ids(rows) == sorted(f"r{i}" for i in range(50))
    # All 50 were queued before the writer task first ran: one batch, one commit.
    assert batches == 1
    assert all((r.prompt_tokens, r.completion_tokens, r.total_tokens) == (7, 20, 27) for r in rows)


def test_max_batch_bounds_a_transaction(run: Callable[[Body], Any]) -> None:
    async def body(store: Store) -> tuple[int, int]:
        writer = LedgerWriter(store, max_batch=8)
        await asyncio.gather(*(writer.record(row(f"r{i}")) for i in range(50)))
        await writer.aclose()
        return writer.batches, len(await list_usage(store=store))

    batches, count = run(body)
    assert count == 50
    assert batches >= 7  # ceil(50 / 8)


def test_record_returns_after_the_commit(run: Callable[[Body], Any], url: str) -> None:
    async def body(store: Store) -> list[Any]:
        writer = LedgerWriter(store)
        await writer.record(row("visible-at-once"))
        # A separate store (its own connection, as another process would read) sees it already.
        async with await Store.open(url) as other:
            seen = await list_usage(store=other, request_id="visible-at-once")
        await writer.aclose()
        return seen

    assert ids(run(body)) == ["visible-at-once"]


def test_close_writes_rows_of_cancelled_callers_and_late_rows(run: Callable[[Body], Any], url: str) -> None:
    async def body(store: Store) -> tuple[int, int]:
        writer = LedgerWriter(store)
        tasks = [asyncio.create_task(writer.record(row(f"c{i}"))) for i in range(20)]
        await asyncio.sleep(0)  # every task has queued its row and waits for the commit
        for task in tasks:
            task.cancel()  # e.g. the client went away: the row must still be written
        close = asyncio.create_task(writer.aclose())
        await asyncio.sleep(0)
        late = asyncio.create_task(writer.record(row("late")))  # handed over while closing
        await close
        await late
        await asyncio.gather(*tasks, return_exceptions=True)
        return writer.written, writer.lost

    written, lost = run(body)
    assert (written, lost) == (21, 0)

    async def read(store: Store) -> list[Any]:
        return await list_usage(store=store)

    # Read after the writer's store is closed, from a fresh one: the rows are on disk.
    assert ids(run(read)) == sorted([*(f"c{i}" for i in range(20)), "late"])


def test_a_bad_row_loses_only_itself(run: Callable[[Body], Any]) -> None:
    async def body(store: Store) -> tuple[list[Any], list[Any], int, int]:
        key = await insert_key(store=store, name="alice", prefix="sk-alice", key_hash="a" * 64)
        writer = LedgerWriter(store)
        rows = [row(f"g{i}", key.id) for i in range(5)]
        # An unknown key id violates the foreign key: the whole first batch fails.
        rows.insert(2, row("bad", "key_000000000000"))
        results = await asyncio.gather(*(writer.record(r) for r in rows), return_exceptions=True)
        # The writer carries on with the next batch.
        await writer.record(row("after", key.id))
        await writer.aclose()
        return results, await list_usage(store=store), writer.lost, writer.written

    results, stored, lost, written = run(body)
    assert isinstance(results[2], IntegrityError)
    assert [r for i, r in enumerate(results) if i != 2] == [None] * 5
    assert ids(stored) == sorted([*(f"g{i}" for i in range(5)), "after"])
    assert (lost, written) == (1, 6)


def test_a_failed_batch_does_not_stop_later_batches(run: Callable[[Body], Any]) -> None:
    async def body(store: Store) -> tuple[list[Any], list[Any]]:
        writer = LedgerWriter(store)
        bad = await asyncio.gather(
            *(writer.record(row(f"bad{i}", "key_000000000000")) for i in range(3)), return_exceptions=True
        )
        await asyncio.gather(*(writer.record(row(f"ok{i}")) for i in range(3)))
        await writer.aclose()
        return bad, await list_usage(store=store)

    bad, stored = run(body)
    assert all(isinstance(b, IntegrityError) for b in bad)
    assert ids(stored) == ["ok0", "ok1", "ok2"]


def test_back_pressure_waits_for_room_and_loses_nothing(run: Callable[[Body], Any]) -> None:
    async def body(store: Store) -> tuple[int, int]:
        writer = LedgerWriter(store, max_pending=2, max_batch=2)
        await asyncio.gather(*(writer.record(row(f"p{i}")) for i in range(30)))
        await writer.aclose()
        return writer.written, len(await list_usage(store=store))

    assert run(body) == (30, 30)


def test_bad_sizes_are_refused(run: Callable[[Body], Any]) -> None:
    async def body(store: Store) -> None:
        with pytest.raises(ValueError):
            LedgerWriter(store, max_batch=0)
        with pytest.raises(ValueError):
            LedgerWriter(store, max_pending=0)

    run(body)


def test_the_async_path_batches_and_contains_failures_too(run: Callable[[Body], Any]) -> None:
    """Without a synchronous connection (any backend but SQLite) batches go through the async store."""

    async def body(store: Store) -> tuple[list[Any], list[Any], int]:
        writer = LedgerWriter(store, write_sync=None)
        rows = [row(f"a{i}") for i in range(5)]
        rows.insert(1, row("bad", "key_000000000000"))
        results = await asyncio.gather(*(writer.record(r) for r in rows), return_exceptions=True)
        await writer.aclose()
        return results, await list_usage(store=store), writer.lost

    results, stored, lost = run(body)
    assert isinstance(results[1], IntegrityError)
    assert ids(stored) == [f"a{i}" for i in range(5)]
    assert lost == 1


def test_jobs_join_the_batch_transaction_and_get_their_results(run: Callable[[Body], Any]) -> None:
    from sqlalchemy import Connection, text

    from qwen_gateway.store.money import settle

    def job(value: int) -> Callable[[Connection], int]:
        return lambda conn: int(conn.execute(text("SELECT :v + 1"), {"v": value}).scalar_one())

    async def body(store: Store) -> tuple[list[Any], int, list[Any]]:
        writer = LedgerWriter(store, in_transaction=lambda conn, rows: settle(conn, rows=rows))
        results = await asyncio.gather(
            *(writer.run(job(i)) for i in range(5)), *(writer.record(row(f"r{i}")) for i in range(5))
        )
        batches = writer.batches
        # One failing job costs only itself: the rest of its batch is written one by one.
        failing = asyncio.gather(
            writer.run(lambda conn: conn.execute(text("SELECT * FROM no_such_table"))),
            writer.record(row("after")),
            return_exceptions=True,
        )
        outcome = await failing
        await writer.aclose()
        return [*results, *outcome], batches, await list_usage(store=store)

    results, batches, rows = run(body)
    assert results[:5] == [1, 2, 3, 4, 5]
    assert results[5:10] == [None] * 5  # unmetered rows: no balance
    assert batches == 1
    assert isinstance(results[10], Exception) and results[11] is None
    assert ids(rows) == sorted(["after", *(f"r{i}" for i in range(5))])


def test_work_handed_over_a_loop_turn_after_the_first_row_joins_its_batch(
    run: Callable[[Body], Any],
) -> None:
    """The writer lets the tasks that are ready to run queue their work before it takes a batch: a
    settlement and the jobs (holds) of requests that reach the writer one loop turn later share one
    transaction instead of costing one each."""
    from sqlalchemy import Connection, text

    from qwen_gateway.store.money import settle

    def job(value: int) -> Callable[[Connection], int]:
        return lambda conn: int(conn.execute(text("SELECT :v + 1"), {"v": value}).scalar_one())

    async def body(store: Store) -> tuple[list[Any], int, list[Any]]:
        writer = LedgerWriter(store, in_transaction=lambda conn, rows: settle(conn, rows=rows))
        await writer.record(row("warm-up"))  # the writer task now waits for its next first item
        before = writer.batches

        async def one_turn_later(i: int) -> Any:
            await asyncio.sleep(0)
            if i % 2:
                return await writer.run(job(i))
            return await writer.record(row(f"late{i}"))

        late = [asyncio.ensure_future(one_turn_later(i)) for i in range(4)]
        first = await writer.record(row("first"))
        results = [first, *(await asyncio.gather(*late))]
        batches = writer.batches - before
        await writer.aclose()
        return results, batches, await list_usage(store=store)

    results, batches, rows = run(body)
    assert results == [None, None, 2, None, 4]
    assert batches == 1
    assert ids(rows) == sorted(["warm-up", "first", "late0", "late2"])


def test_the_writers_transactions_and_rows_are_metrics(run: Callable[[Body], Any]) -> None:
    from qwen_gateway.service.metrics import Metrics

    async def body(store: Store) -> tuple[str, int]:
        writer = LedgerWriter(store)
        metrics = Metrics()
        metrics.watch_ledger(writer)
        await asyncio.gather(*(writer.record(row(f"r{i}")) for i in range(3)))
        await writer.record(row("alone"))
        await writer.aclose()
        return metrics.render().decode(), writer.batches

    text, batches = run(body)
    assert f"qwen_gateway_ledger_transactions_total {float(batches)}" in text
    assert "qwen_gateway_ledger_rows_total 4.0" in text
    assert "qwen_gateway_ledger_rows_lost_total 0.0" in text
    assert batches == 2  # the three that queued together, then the one alone
