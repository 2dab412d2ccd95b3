from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from qwen_gateway.store.db import Store
from qwen_gateway.store.keys import (
    DuplicateKeyName,
    KeyRow,
    find_active_key_by_hash,
    get_key,
    insert_key,
    list_keys,
    new_key_id,
    revoke_key,
)
from tests.unit.store.conftest import StoreRunner


async def _add(store: Store, name: str, *, key_hash: str | None = None, **kwargs: Any) -> KeyRow:
    return await insert_key(
        store=store, name=name, prefix="sk-" + name[:5], key_hash=key_hash or name.ljust(64, "0"), **kwargs
    )


def test_new_ids_look_like_key_ids() -> None:
    ids = {new_key_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(i.startswith("key_") and len(i) == 16 and int(i[4:], 16) >= 0 for i in ids)


def test_insert_then_find_by_hash(with_store: StoreRunner) -> None:
    async def body(store: Store) -> tuple[KeyRow, KeyRow | None, KeyRow | None]:
        row = await _add(store, "alice", balance_micro=12_500_000)
        return (
            row,
            await find_active_key_by_hash(store=store, key_hash=row.key_hash),
            (await find_active_key_by_hash(store=store, key_hash="f" * 64)),
        )

    row, found, missing = with_store(body)
    assert found == row
    assert missing is None
    assert found.balance_micro == 12_500_000
    assert found.created_at.tzinfo is UTC
    assert found.active


def test_rows_keep_the_hash_out_of_repr(with_store: StoreRunner) -> None:
    row = with_store(lambda store: _add(store, "alice", key_hash="secret-hash".ljust(64, "x")))
    assert "secret-hash" not in repr(row)


def test_duplicate_names_raise_duplicate_key_name(with_store: StoreRunner) -> None:
    async def body(store: Store) -> None:
        await _add(store, "alice")
        await _add(store, "alice", key_hash="z" * 64)

    with pytest.raises(DuplicateKeyName) as info:
        with_store(body)
    assert info.value.name == "alice"


def test_a_duplicate_hash_is_not_reported_as_a_duplicate_name(with_store: StoreRunner) -> None:
    from sqlalchemy.exc import IntegrityError

    async def body(store: Store) -> None:
        await _add(store, "alice", key_hash="a" * 64)
        await _add(store, "bob", key_hash="a" * 64)

    with pytest.raises(IntegrityError):
        with_store(body)


def test_list_keys_in_creation_order(with_store: StoreRunner) -> None:
    start = datetime(2025, 1, 1, tzinfo=UTC)

    async def body(store: Store) -> tuple[list[str], list[str]]:
        await _add(store, "second", created_at=start + timedelta(seconds=1))
        await _add(store, "first", created_at=start)
        await _add(store, "third", created_at=start + timedelta(seconds=2))
        await revoke_key(store=store, name_or_id="third")
        return (
            [k.name for k in await list_keys(store=store)],
            [k.name for k in await list_keys(store=store, include_revoked=False)],
        )

    assert with_store(body) == (["first", "second", "third"], ["first", "second"])


def test_created_at_round_trips_as_utc(with_store: StoreRunner) -> None:
    from zoneinfo import ZoneInfo

    shanghai = datetime(2025, 3, 1, 20, 0, tzinfo=ZoneInfo("Asia/Shanghai"))

    async def body(store: Store) -> KeyRow | None:
        await _add(store, "a", created_at=shanghai)
        return await get_key(store=store, name_or_id="a")

    row = with_store(body)
    assert row is not None
    assert row.created_at == shanghai
    assert row.created_at.tzinfo is UTC
    assert row.created_at.hour == 12


def test_naive_datetimes_are_refused(with_store: StoreRunner) -> None:
    with pytest.raises(Exception, match="naive datetime"):
        with_store(lambda store: _add(store, "a", created_at=datetime(2025, 1, 1)))


def test_revoke_by_name_or_id(with_store: StoreRunner) -> None:
    async def body(store: Store) -> None:
        a = await _add(store, "alice")
        b = await _add(store, "bob")
        by_name = await revoke_key(store=store, name_or_id="alice")
        by_id = await revoke_key(store=store, name_or_id=b.id)
        assert by_name is not None and by_name.id == a.id and by_name.revoked_at is not None
        assert by_id is not None and by_id.name == "bob" and by_id.revoked_at is not None
        assert await find_active_key_by_hash(store=store, key_hash=a.key_hash) is None
        assert await find_active_key_by_hash(store=store, key_hash=b.key_hash) is None

    with_store(body)


def test_revoking_twice_keeps_the_first_time(with_store: StoreRunner) -> None:
    first = datetime(2025, 1, 1, tzinfo=UTC)

    async def body(store: Store) -> tuple[KeyRow | None, KeyRow | None]:
        await _add(store, "alice")
        once = await revoke_key(store=store, name_or_id="alice", now=first)
        twice = await revoke_key(store=store, name_or_id="alice", now=first + timedelta(days=1))
        return once, twice

    once, twice = with_store(body)
    assert once is not None and twice is not None
    assert once.revoked_at == twice.revoked_at == first


def test_revoke_unknown_is_none(with_store: StoreRunner) -> None:
    assert with_store(lambda store: revoke_key(store=store, name_or_id="nobody")) is None


def test_an_id_match_wins_over_a_name_match(with_store: StoreRunner) -> None:
    async def body(store: Store) -> None:
        target = await _add(store, "target", key_id="key_000000000001")
        # A (legacy) name equal to another key's id must not be revoked instead of, or with, it.
        impostor = await _add(store, "key_000000000001", key_hash="i" * 64)
        await revoke_key(store=store, name_or_id=target.id)
        again = await revoke_key(store=store, name_or_id=target.id)
        assert again is not None and again.id == target.id
        assert await find_active_key_by_hash(store=store, key_hash=impostor.key_hash) is not None

    with_store(body)


def test_functions_join_a_callers_transaction(with_store: StoreRunner) -> None:
    class Abort(Exception):
        pass

    async def body(store: Store) -> list[KeyRow]:
        with pytest.raises(Abort):
            async with store.begin() as conn:
                await insert_key(store=conn, name="rolled-back", prefix="sk-rolle", key_hash="r" * 64)
                assert await get_key(store=conn, name_or_id="rolled-back") is not None
                raise Abort
        return await list_keys(store=store)

    assert with_store(body) == []
