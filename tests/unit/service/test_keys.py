from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from qwen_gateway.errors import AuthenticationError, GatewayError
from qwen_gateway.service.keys import InvalidKeyName, KeyNameTaken, KeyService, hash_key
from qwen_gateway.store.db import Store
from qwen_gateway.store.keys import find_active_key_by_hash, list_keys


@pytest.fixture
def run(db_url: str) -> Callable[[Callable[[Store], Awaitable[Any]]], Any]:
    url = db_url

    def runner(body: Callable[[Store], Awaitable[Any]]) -> Any:
        async def main() -> Any:
            async with await Store.open(url) as store:
                return await body(store)

        return asyncio.run(main())

    return runner


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_create_makes_a_high_entropy_key_and_stores_only_its_hash(run: Any, db_url: str) -> None:
    async def body(store: Store) -> tuple[Any, str, str]:
        row, raw = await KeyService(store).create("alice")
        async with store.connect() as conn:
            stored = repr((await conn.execute(text("SELECT * FROM api_keys"))).all())
        return row, raw, stored

    row, raw, stored = run(body)
    assert re.fullmatch(r"sk-[0-9a-f]{32}", raw)
    assert row.name == "alice"
    assert re.fullmatch(r"key_[0-9a-f]{12}", row.id)
    assert row.prefix == raw[:8]
    assert row.key_hash == hashlib.sha256(raw.encode()).hexdigest() == hash_key(raw)
    assert row.revoked_at is None and row.balance_micro is None
    # The key itself is in no column, and (SQLite) nowhere in the database files.
    assert raw not in stored and raw[8:] not in stored
    if db_url.startswith("sqlite"):
        for path in Path(db_url.partition(":///")[2]).parent.glob("gateway.db*"):
            assert raw.encode() not in path.read_bytes()


def test_keys_are_unique(run: Any) -> None:
    async def body(store: Store) -> set[str]:
        service = KeyService(store)
        return {(await service.create(f"k{i}"))[1] for i in range(20)}

    assert len(run(body)) == 20


def test_authenticate_accepts_the_key_and_refuses_others(run: Any) -> None:
    async def body(store: Store) -> None:
        service = KeyService(store)
        row, raw = await service.create("alice")
        assert await service.authenticate(raw) == row
        for bad in (None, "", raw[:-1], raw + "0", raw.upper(), "sk-" + "0" * 32, "x" * 10_000):
            with pytest.raises(AuthenticationError) as info:
                await service.authenticate(bad)
            assert info.value.status == 401

    run(body)


def test_duplicate_names_are_a_clear_error(run: Any) -> None:
    async def body(store: Store) -> None:
        service = KeyService(store)
        await service.create("alice")
        with pytest.raises(KeyNameTaken, match="alice") as info:
            await service.create("alice")
        assert isinstance(info.value, GatewayError)
        assert len(await list_keys(store=store)) == 1

    run(body)


@pytest.mark.parametrize("name", ["", "   ", "x" * 101, "tab\there", "key_0123456789ab"])
def test_unusable_names_are_refused(run: Any, name: str) -> None:
    async def body(store: Store) -> None:
        with pytest.raises(InvalidKeyName):
            await KeyService(store).create(name)

    run(body)


def test_names_are_trimmed(run: Any) -> None:
    async def body(store: Store) -> str:
        row, _ = await KeyService(store).create("  alice ")
        return row.name

    assert run(body) == "alice"


def test_list_never_needs_the_key_and_revoke_stops_authentication(run: Any) -> None:
    async def body(store: Store) -> None:
        service = KeyService(store)
        a, raw_a = await service.create("alice")
        b, raw_b = await service.create("bob")
        assert [k.name for k in await service.list()] == ["alice", "bob"]
        await service.authenticate(raw_a)  # now cached
        revoked = await service.revoke("alice")
        assert revoked is not None and revoked.id == a.id and revoked.revoked_at is not None
        # Revoked through this service: refused at once, cache or not.
        with pytest.raises(AuthenticationError):
            await service.authenticate(raw_a)
        assert (await service.revoke(b.id)) is not None
        with pytest.raises(AuthenticationError):
            await service.authenticate(raw_b)
        assert await service.revoke("nobody") is None
        assert [k.active for k in await service.list()] == [False, False]
        assert await service.list(include_revoked=False) == []
        assert (await service.get("bob")) == (await service.get(b.id))

    run(body)


def test_the_cache_spares_sql_and_honours_outside_revocation_after_its_ttl(
    run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def body(store: Store) -> None:
        clock = FakeClock()
        server = KeyService(store, cache_ttl=5.0, clock=clock)
        cli = KeyService(store, cache_ttl=0)
        _, raw = await cli.create("alice")
        await server.authenticate(raw)

        lookups = 0

        async def counting(**kwargs: Any) -> Any:
            nonlocal lookups
            lookups += 1
            return await find_active_key_by_hash(**kwargs)

        monkeypatch.setattr("qwen_gateway.service.keys.find_active_key_by_hash", counting)
        for _ in range(10):
            await server.authenticate(raw)
        assert lookups == 0

        await cli.revoke("alice")  # e.g. `qwen-gateway keys revoke` in another process
        clock.now += 4.9
        await server.authenticate(raw)  # still within the TTL
        clock.now += 0.2
        with pytest.raises(AuthenticationError):
            await server.authenticate(raw)
        assert lookups == 1

    run(body)


def test_unknown_keys_are_not_cached_so_new_keys_work_at_once(run: Any) -> None:
    async def body(store: Store) -> None:
        server = KeyService(store, clock=FakeClock())
        cli = KeyService(store)
        with pytest.raises(AuthenticationError):
            await server.authenticate("sk-" + "1" * 32)
        _, raw = await cli.create("new")
        assert (await server.authenticate(raw)).name == "new"

    run(body)


def test_the_cache_is_bounded(run: Any) -> None:
    async def body(store: Store) -> int:
        service = KeyService(store, cache_size=3, clock=FakeClock())
        for i in range(6):
            _, raw = await service.create(f"k{i}")
            await service.authenticate(raw)
        return len(service._cache)

    assert run(body) == 3


def test_a_key_is_found_by_its_hash_only(run: Any) -> None:
    async def body(store: Store) -> None:
        row, raw = await KeyService(store).create("alice")
        assert await find_active_key_by_hash(store=store, key_hash=hash_key(raw)) == row
        assert await find_active_key_by_hash(store=store, key_hash=raw) is None

    run(body)


def test_concurrent_misses_of_one_key_share_one_lookup(run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # A burst of requests with a key that is not cached (yet, or any more) costs one SQL lookup.
    import qwen_gateway.service.keys as keys_module

    lookups: list[str] = []
    real = keys_module.find_active_key_by_hash

    async def counted(**kwargs: Any) -> Any:  # the real lookup, counted
        lookups.append(kwargs["key_hash"])
        return await real(**kwargs)

    monkeypatch.setattr(keys_module, "find_active_key_by_hash", counted)

    async def body(store: Store) -> tuple[list[Any], list[Any]]:
        service = KeyService(store)
        row, raw = await service.create("burst")
        found = await asyncio.gather(*(service.authenticate(raw) for _ in range(40)))
        bogus = await asyncio.gather(
            *(service.authenticate("sk-" + "0" * 32) for _ in range(10)), return_exceptions=True
        )
        assert all(r.id == row.id for r in found)
        return found, bogus

    _, bogus = run(body)
    assert all(isinstance(e, AuthenticationError) for e in bogus)
    assert len(lookups) == 2  # one for the key, one for the unknown key (never cached)


def test_a_lookup_that_started_before_a_revocation_is_not_cached(
    run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import qwen_gateway.service.keys as keys_module

    real = keys_module.find_active_key_by_hash
    found, proceed = asyncio.Event(), asyncio.Event()

    async def held_back(**kwargs: Any) -> Any:  # the real lookup, its answer held until the revocation
        row = await real(**kwargs)
        found.set()
        await proceed.wait()
        return row

    async def body(store: Store) -> None:
        service = KeyService(store)
        _, raw = await service.create("racer")
        monkeypatch.setattr(keys_module, "find_active_key_by_hash", held_back)
        pending = asyncio.ensure_future(service.authenticate(raw))
        await found.wait()  # the lookup read the key while it was active
        await service.revoke("racer")
        proceed.set()
        await pending  # it began before the revocation: this one answer still accepts the key
        monkeypatch.setattr(keys_module, "find_active_key_by_hash", real)
        with pytest.raises(AuthenticationError):
            await service.authenticate(raw)  # but the outdated row was not cached

    run(body)
