"""Admin keys on a real store (SQLite and PostgreSQL): apart from API keys, hashed, revocable at once."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy import text

from qwen_gateway.errors import AdminAccessDenied, AuthenticationError, ResourceNotFound
from qwen_gateway.service.admin import AdminNameTaken, AdminService
from qwen_gateway.service.keys import KeyService, hash_key
from qwen_gateway.store.db import Store
from qwen_gateway.store.usage import NewUsage, insert_usage

Body = Callable[[AdminService, Store], Awaitable[Any]]


@pytest.fixture
def run(db_url: str) -> Callable[[Body], Any]:
    def runner(body: Body) -> Any:
        async def main() -> Any:
            async with await Store.open(db_url) as store:
                return await body(AdminService(store, KeyService(store, cache_ttl=0)), store)

        return asyncio.run(main())

    return runner


def test_admin_keys_are_random_shown_once_and_stored_hashed(run: Callable[[Body], Any]) -> None:
    async def body(admin: AdminService, store: Store) -> tuple[Any, str, str]:
        row, raw = await admin.create_admin_key("ops")
        async with store.connect() as conn:
            stored = repr((await conn.execute(text("SELECT * FROM admin_keys"))).all())
        return row, raw, stored

    row, raw, stored = run(body)
    assert re.fullmatch(r"qgw-admin-[0-9a-f]{32}", raw)
    assert row.key_hash == hash_key(raw) and row.prefix == raw[:14]
    assert raw not in stored and raw[14:] not in stored and "key_hash" not in repr(row)


def test_only_admin_keys_authenticate_and_api_keys_get_403(run: Callable[[Body], Any]) -> None:
    async def body(admin: AdminService, store: Store) -> list[str]:
        _, raw_admin = await admin.create_admin_key("ops")
        _, raw_user = await KeyService(store).create("alice")
        outcomes = []
        for candidate in (raw_admin, raw_user, raw_admin + "x", "", None, "x" * 10_000):
            try:
                await admin.authenticate(candidate)
                outcomes.append("ok")
            except AdminAccessDenied:
                outcomes.append("403")
            except AuthenticationError:
                outcomes.append("401")
        return outcomes

    assert run(body) == ["ok", "403", "401", "401", "401", "401"]


def test_a_revoked_admin_key_stops_at_once(run: Callable[[Body], Any]) -> None:
    async def body(admin: AdminService, store: Store) -> tuple[str, Any, Any]:
        row, raw = await admin.create_admin_key("ops")
        await admin.authenticate(raw)
        revoked = await admin.revoke_admin_key("ops")
        again = await admin.revoke_admin_key(row.id)
        try:
            await admin.authenticate(raw)
        except AuthenticationError:
            return "401", revoked, again
        return "ok", revoked, again

    outcome, revoked, again = run(body)
    assert outcome == "401"
    assert revoked.revoked_at is not None and again.revoked_at == revoked.revoked_at


def test_admin_key_names_are_unique(run: Callable[[Body], Any]) -> None:
    async def body(admin: AdminService, store: Store) -> None:
        await admin.create_admin_key("ops")
        with pytest.raises(AdminNameTaken):
            await admin.create_admin_key("ops")

    run(body)


def test_overview_sums_each_keys_ledger_and_unknown_keys_are_404(run: Callable[[Body], Any]) -> None:
    async def body(admin: AdminService, store: Store) -> tuple[dict[str, Any], list[Any], str]:
        keys = KeyService(store)
        alice, _ = await keys.create("alice", balance_micro=5_000_000)
        bob, _ = await keys.create("bob")
        rows = [
            NewUsage(
                request_id=f"r{i}",
                key_id=alice.id if i < 3 else bob.id,
                model="qwen-plus",
                endpoint="chat.completions",
                prompt_tokens=10,
                completion_tokens=5,
                status="ok",
                cost_micro=100 * (i + 1),
            )
            for i in range(4)
        ]
        await insert_usage(store=store, rows=rows)
        with pytest.raises(ResourceNotFound):
            await admin.one("nobody")
        with pytest.raises(ResourceNotFound):
            await admin.top_up("nobody", 1)
        views = {v.key.name: v.spend for v in await admin.overview()}
        usage = await admin.usage(days=1, today=rows[0].created_at.date())
        return views, usage, rows[0].created_at.date().isoformat()

    views, usage, day = run(body)
    assert (views["alice"].requests, views["alice"].cost_micro) == (3, 600)
    assert (views["bob"].requests, views["bob"].cost_micro) == (1, 400)
    assert sorted((u.key_id is not None, u.requests, u.sums["cost_micro"]) for u in usage) == [
        (True, 1, 400),
        (True, 3, 600),
    ]
    assert {u.day for u in usage} == {day}
