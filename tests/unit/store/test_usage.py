from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.exc import IntegrityError

from qwen_gateway.store.db import Store
from qwen_gateway.store.keys import KeyRow, insert_key
from qwen_gateway.store.usage import NewUsage, UsageRow, insert_usage, list_usage, record_usage
from tests.unit.store.conftest import StoreRunner


async def _key(store: Store) -> KeyRow:
    return await insert_key(store=store, name="alice", prefix="sk-alice", key_hash="a" * 64)


async def _record(store: Store, key_id: str | None, request_id: str = "req-1", **kwargs: object) -> UsageRow:
    values: dict[str, object] = {
        "model": "qwen-plus",
        "endpoint": "chat.completions",
        "prompt_tokens": 20,
        "completion_tokens": 8,
        "status": "ok",
    }
    values.update(kwargs)
    return await record_usage(store=store, request_id=request_id, key_id=key_id, **values)  # type: ignore[arg-type]


def test_record_and_list(with_store: StoreRunner) -> None:
    async def body(store: Store) -> tuple[UsageRow, list[UsageRow]]:
        key = await _key(store)
        row = await _record(store, key.id, cost_micro=70)
        return row, await list_usage(store=store, key_id=key.id)

    row, listed = with_store(body)
    assert row.id >= 1
    assert row.total_tokens == 28
    assert len(listed) == 1
    stored = listed[0]
    assert (stored.id, stored.request_id, stored.model, stored.endpoint, stored.status) == (
        row.id,
        "req-1",
        "qwen-plus",
        "chat.completions",
        "ok",
    )
    assert (stored.prompt_tokens, stored.completion_tokens, stored.total_tokens) == (20, 8, 28)
    assert stored.cost_micro == 70
    assert stored.created_at == row.created_at


def test_costs_are_exact_integer_micro_units(with_store: StoreRunner) -> None:
    big = 9_007_199_254_740_993  # 2**53 + 1: a float (SQLite REAL) could not keep it

    async def body(store: Store) -> tuple[UsageRow, list[UsageRow]]:
        row = await _record(store, None, cost_micro=big)
        return row, await list_usage(store=store)

    row, listed = with_store(body)
    assert row.cost_micro == big
    assert listed[0].cost_micro == big


def test_unauthenticated_usage_has_no_key_and_no_cost(with_store: StoreRunner) -> None:
    async def body(store: Store) -> list[UsageRow]:
        await _record(store, None, status="cancelled")
        return await list_usage(store=store)

    (row,) = with_store(body)
    assert row.key_id is None
    assert row.cost_micro is None
    assert row.status == "cancelled"


def test_an_unknown_key_id_violates_the_foreign_key(with_store: StoreRunner) -> None:
    with pytest.raises(IntegrityError):
        with_store(lambda store: _record(store, "key_doesnotexist"))


@pytest.mark.parametrize("kwargs", [{"status": "done"}, {"prompt_tokens": -1}, {"completion_tokens": -5}])
def test_bad_values_are_refused(with_store: StoreRunner, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        with_store(lambda store: _record(store, None, **kwargs))


def test_filters_and_limit(with_store: StoreRunner) -> None:
    async def body(store: Store) -> tuple[list[str], list[str], list[str]]:
        key = await _key(store)
        for i in range(5):
            await _record(store, key.id if i % 2 else None, request_id=f"r{i}")
        return (
            [u.request_id for u in await list_usage(store=store, limit=3)],
            [u.request_id for u in await list_usage(store=store, key_id=key.id)],
            [u.request_id for u in await list_usage(store=store, request_id="r2")],
        )

    newest, for_key, one = with_store(body)
    assert newest == ["r2", "r3", "r4"]
    assert for_key == ["r1", "r3"]
    assert one == ["r2"]


def test_a_callers_transaction_makes_usage_atomic_with_other_writes(with_store: StoreRunner) -> None:
    async def body(store: Store) -> list[UsageRow]:
        with pytest.raises(RuntimeError):
            async with store.begin() as conn:
                await _record(conn, None)  # type: ignore[arg-type]
                raise RuntimeError("the debit failed")
        return await list_usage(store=store)

    assert with_store(body) == []


def _new(request_id: str, key_id: str | None = None) -> NewUsage:
    return NewUsage(
        request_id=request_id,
        key_id=key_id,
        model="qwen-plus",
        endpoint="chat.completions",
        prompt_tokens=3,
        completion_tokens=4,
        status="ok",
    )


def test_insert_usage_writes_a_batch_in_one_statement(with_store: StoreRunner) -> None:
    async def body(store: Store) -> list[UsageRow]:
        await insert_usage(store=store, rows=[_new(f"b{i}") for i in range(3)])
        await insert_usage(store=store, rows=[])
        return await list_usage(store=store)

    rows = with_store(body)
    assert [r.request_id for r in rows] == ["b0", "b1", "b2"]
    assert all(r.total_tokens == 7 and r.created_at.tzinfo is not None for r in rows)


def test_insert_usage_is_all_or_nothing(with_store: StoreRunner) -> None:
    async def body(store: Store) -> list[UsageRow]:
        with pytest.raises(IntegrityError):
            await insert_usage(store=store, rows=[_new("b0"), _new("b1", "key_doesnotexist")])
        return await list_usage(store=store)

    assert with_store(body) == []


@pytest.mark.parametrize("kwargs", [{"status": "done"}, {"prompt_tokens": -1}])
def test_new_usage_checks_its_values(kwargs: dict[str, Any]) -> None:
    values: dict[str, Any] = {
        "request_id": "r",
        "key_id": None,
        "model": "m",
        "endpoint": "chat.completions",
        "prompt_tokens": 1,
        "completion_tokens": 1,
        "status": "ok",
    }
    with pytest.raises(ValueError):
        NewUsage(**{**values, **kwargs})


def test_sqlite_commits_without_a_flush_per_commit(with_sqlite_store: StoreRunner) -> None:
    """WAL with synchronous=NORMAL (1): see store/db.py for what that keeps after a crash."""

    async def body(store: Store) -> tuple[str, int]:
        async with store.connect() as conn:
            mode = (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar_one()
            sync = (await conn.exec_driver_sql("PRAGMA synchronous")).scalar_one()
        return mode, sync

    assert with_sqlite_store(body) == ("wal", 1)
