from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, create_engine, inspect, text

from qwen_gateway.errors import StartupError
from qwen_gateway.store.db import MIGRATIONS_DIR, Store, transaction
from qwen_gateway.store.keys import insert_key, list_keys
from qwen_gateway.store.tables import metadata
from tests.unit.store.conftest import StoreRunner


def test_open_creates_the_directory_and_migrates(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "gateway.db"

    async def main() -> set[str]:
        async with await Store.open(f"sqlite+aiosqlite:///{path}") as store, store.connect() as conn:
            rows = await conn.execute(text("SELECT name FROM sqlite_master WHERE type = 'table'"))
            return {r[0] for r in rows}

    assert {"api_keys", "usage_ledger", "alembic_version"} <= asyncio.run(main())
    assert path.is_file()


def test_sqlite_connections_use_wal_busy_timeout_and_foreign_keys(with_sqlite_store: StoreRunner) -> None:
    async def body(store: Store) -> tuple[Any, ...]:
        async with store.connect() as conn:
            return tuple(
                [
                    (await conn.execute(text(f"PRAGMA {p}"))).scalar()
                    for p in ("journal_mode", "busy_timeout", "foreign_keys")
                ]
            )

    journal, busy, fks = with_sqlite_store(body)
    assert journal == "wal"
    assert busy >= 1000
    assert fks == 1


def test_the_migrated_schema_matches_the_tables_module(with_store: StoreRunner) -> None:
    def diff(conn: Connection) -> list[Any]:
        return list(compare_metadata(MigrationContext.configure(conn), metadata))

    async def body(store: Store) -> list[Any]:
        async with store.connect() as conn:
            return await conn.run_sync(diff)

    assert with_store(body) == []


def test_reopening_is_idempotent_and_keeps_data(db_url: str) -> None:
    async def main() -> int:
        async with await Store.open(db_url) as store:
            await insert_key(store=store, name="a", prefix="sk-aaaaa", key_hash="h" * 64)
        async with await Store.open(db_url) as store:
            return len(await list_keys(store=store))

    assert asyncio.run(main()) == 1


def test_a_plain_sqlite_url_gets_the_async_driver(tmp_path: Path) -> None:
    async def main() -> str:
        async with await Store.open(f"sqlite:///{tmp_path / 'g.db'}") as store:
            return store.engine.url.drivername

    assert asyncio.run(main()) == "sqlite+aiosqlite"


def test_in_memory_sqlite_works() -> None:
    async def main() -> int:
        async with await Store.open("sqlite+aiosqlite://") as store:
            await insert_key(store=store, name="a", prefix="sk-aaaaa", key_hash="h" * 64)
            return len(await list_keys(store=store))

    assert asyncio.run(main()) == 1


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("not a url", "invalid database URL"),
        ("nosuchdb+nodriver://x/y", "cannot open database"),
    ],
)
def test_bad_urls_are_one_line_startup_errors(url: str, fragment: str) -> None:
    with pytest.raises(StartupError) as info:
        asyncio.run(Store.open(url))
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_an_unopenable_file_is_a_startup_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StartupError) as info:
        asyncio.run(Store.open(f"sqlite+aiosqlite:///{blocker / 'sub' / 'g.db'}"))
    assert "\n" not in str(info.value)


def test_a_database_from_a_newer_gateway_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "g.db"
    asyncio.run(_open_and_close(f"sqlite+aiosqlite:///{path}"))
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999_from_the_future'")
    with pytest.raises(StartupError) as info:
        asyncio.run(Store.open(f"sqlite+aiosqlite:///{path}"))
    assert "9999_from_the_future" in str(info.value)


def _tables(url: str) -> set[str]:
    # A synchronous engine on the same database: psycopg is sync and async; SQLite needs the stdlib driver.
    engine = create_engine(url.replace("sqlite+aiosqlite", "sqlite", 1))
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_migrations_downgrade_cleanly(db_url: str) -> None:
    asyncio.run(_open_and_close(db_url))
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # The Alembic CLI path of env.py: no shared connection, a URL given with -x.
    config.cmd_opts = type("Opts", (), {"x": [f"url={db_url}"]})()
    command.downgrade(config, "base")
    assert _tables(db_url) == {"alembic_version"}
    command.upgrade(config, "head")
    assert {"api_keys", "usage_ledger"} <= _tables(db_url)
    # And the gateway opens the database the CLI migrated without changing it again.
    asyncio.run(_open_and_close(db_url))


def test_servers_starting_together_on_postgresql_migrate_once(postgres_url: str) -> None:
    """Two processes opening a fresh database at once: the advisory lock makes the second wait."""
    url = postgres_url.replace("postgresql://", "postgresql+psycopg://", 1)

    async def main() -> list[str]:
        stores = await asyncio.gather(*(Store.open(url) for _ in range(3)))
        try:
            await insert_key(store=stores[0], name="one", prefix="sk-11111", key_hash="1" * 64)
            return [r.name for r in await list_keys(store=stores[2])]
        finally:
            for store in stores:
                await store.aclose()

    assert asyncio.run(main()) == ["one"]
    assert {"api_keys", "usage_ledger", "alembic_version"} <= _tables(url)


def test_a_plain_postgresql_url_gets_psycopg(postgres_url: str) -> None:
    async def main() -> str:
        async with await Store.open(postgres_url) as store:
            return store.engine.url.drivername

    assert asyncio.run(main()) == "postgresql+psycopg"


def test_two_stores_on_one_file_wait_for_each_other(sqlite_url: str) -> None:
    """The CLI and a running server share the SQLite file: a writer waits for the other's lock."""

    async def main() -> int:
        async with await Store.open(sqlite_url) as server, await Store.open(sqlite_url) as cli:
            async with server.begin() as conn:
                await insert_key(store=conn, name="server", prefix="sk-sssss", key_hash="s" * 64)
                # The server's transaction holds the write lock while the CLI tries to write.
                cli_write = asyncio.create_task(
                    insert_key(store=cli, name="cli", prefix="sk-ccccc", key_hash="c" * 64)
                )
                await asyncio.sleep(0.3)
                assert not cli_write.done()
            await cli_write
            return len(await list_keys(store=server))

    assert asyncio.run(main()) == 2


async def _open_and_close(url: str) -> None:
    store = await Store.open(url)
    await store.aclose()


def test_a_password_never_reaches_the_error_message() -> None:
    with pytest.raises(StartupError) as info:
        asyncio.run(Store.open("postgresql+nosuchdriver://user:hunter2@db.example/gateway"))
    assert "hunter2" not in str(info.value)
    assert "db.example" in str(info.value)


def test_the_writers_thread_connection_works_on_both_databases(db_url: str) -> None:
    """SQLite files and PostgreSQL (psycopg, sync) get the one-thread-hop-per-batch connection."""

    async def main() -> int:
        async with await Store.open(db_url) as store:
            threaded = store.threaded()
            assert threaded is not None
            try:
                return int(await threaded.run(lambda conn: conn.execute(text("SELECT 41 + 1")).scalar_one()))
            finally:
                await threaded.aclose()

    assert asyncio.run(main()) == 42


def test_the_writers_thread_runs_in_order_survives_errors_and_runs_work_of_cancelled_callers(
    db_url: str,
) -> None:
    """Calls run one at a time in the order handed over; a failing call raises in its caller and the
    next one gets a fresh connection; a call whose caller is cancelled before it ran still runs (its
    transaction is not skipped), and close waits for everything handed over before it."""

    async def main() -> tuple[list[int], list[int]]:
        async with await Store.open(db_url) as store:
            threaded = store.threaded()
            assert threaded is not None
            await threaded.run(
                lambda conn: _exec(conn, "CREATE TABLE hop_order (seq INTEGER NOT NULL, n INTEGER NOT NULL)")
            )
            calls = [
                asyncio.ensure_future(
                    threaded.run(
                        lambda conn, i=i: _exec(
                            conn, f"INSERT INTO hop_order SELECT count(*), {i} FROM hop_order"
                        )
                    )
                )
                for i in range(5)
            ]
            await asyncio.sleep(0)  # every call is handed over
            calls[3].cancel()  # its caller goes away; the insert still runs
            with pytest.raises(Exception, match="no_such_table"):
                await threaded.run(lambda conn: _exec(conn, "SELECT * FROM no_such_table"))
            await asyncio.gather(*calls, return_exceptions=True)
            late = threaded.run(
                lambda conn: _exec(conn, "INSERT INTO hop_order SELECT count(*), 5 FROM hop_order")
            )
            late_task = asyncio.ensure_future(late)
            await asyncio.sleep(0)
            await threaded.aclose()  # after the call handed over before it
            await late_task
            async with transaction(store) as conn:
                rows = list((await conn.execute(text("SELECT n FROM hop_order ORDER BY seq"))).scalars())
                await conn.execute(text("DROP TABLE hop_order"))
            return sorted(rows), rows

    ordered, stored = asyncio.run(main())
    assert ordered == [0, 1, 2, 3, 4, 5]
    assert stored == [0, 1, 2, 3, 4, 5]  # in the order handed over


def _exec(conn: Connection, sql: str) -> None:
    with conn.begin():
        conn.execute(text(sql))


def test_a_migration_that_fails_half_way_on_sqlite_changes_nothing(tmp_path: Path) -> None:
    """A database at revision 0001 whose upgrade fails part-way (here: a table 0002 creates is already
    there) keeps its 0001 schema, whole, and migrates once the obstacle is gone."""
    path = tmp_path / "gateway.db"
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        config.attributes["connection"] = conn
        command.upgrade(config, "0001")
    engine.dispose()
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE holds (x INTEGER)")
        before = [r[1] for r in db.execute("PRAGMA table_info(api_keys)")]

    with pytest.raises(StartupError, match="cannot migrate"):
        asyncio.run(Store.open(f"sqlite+aiosqlite:///{path}"))
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [("0001",)]
        # 0002 adds balance_micro before it creates holds: that change was rolled back with the rest.
        assert [r[1] for r in db.execute("PRAGMA table_info(api_keys)")] == before
        db.execute("DROP TABLE holds")

    async def reopen() -> None:
        store = await Store.open(f"sqlite+aiosqlite:///{path}")
        await store.aclose()

    asyncio.run(reopen())
    with sqlite3.connect(path) as db:
        columns = {r[1] for r in db.execute("PRAGMA table_info(api_keys)")}
        assert "balance_micro" in columns and "balance" not in columns
