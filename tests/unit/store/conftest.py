from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from qwen_gateway.store.db import Store
from tests.databases import backend, db_url, postgres_url  # noqa: F401  (fixtures: every test on both)

StoreRunner = Callable[[Callable[[Store], Awaitable[Any]]], Any]


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """For the tests of what only SQLite does (pragmas, its file lock)."""
    return f"sqlite+aiosqlite:///{tmp_path / 'data' / 'gateway.db'}"


def _runner(url: str) -> StoreRunner:
    def run(body: Callable[[Store], Awaitable[Any]]) -> Any:
        async def main() -> Any:
            async with await Store.open(url) as store:
                return await body(store)

        return asyncio.run(main())

    return run


@pytest.fixture
def with_store(db_url: str) -> StoreRunner:  # noqa: F811
    """Run ``body(store)`` on a freshly migrated store (SQLite, then PostgreSQL) in its own event loop."""
    return _runner(db_url)


@pytest.fixture
def with_sqlite_store(sqlite_url: str) -> StoreRunner:
    return _runner(sqlite_url)
