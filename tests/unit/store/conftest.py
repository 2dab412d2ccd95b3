from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from qwen_gateway.store.db import Store

StoreRunner = Callable[[Callable[[Store], Awaitable[Any]]], Any]


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'data' / 'gateway.db'}"


@pytest.fixture
def with_store(db_url: str) -> StoreRunner:
    """Run ``body(store)`` on a freshly migrated store in its own event loop (no pytest-asyncio)."""

    def run(body: Callable[[Store], Awaitable[Any]]) -> Any:
        async def main() -> Any:
            async with await Store.open(db_url) as store:
                return await body(store)

        return asyncio.run(main())

    return run
