"""One synchronous connection driven by one worker thread, for batched writes.

Why: through the async driver (aiosqlite) every step of a transaction (checkout, execute, commit, the
pool's reset on return) is a hop to the driver's thread and back, measured at ~680 µs of CPU for a
one-row transaction on one core. Run in one worker thread on a synchronous connection, the whole
transaction is one hop: ~190 µs for one row, ~28 µs per row in batches of 16 (same machine). Only
SQLite has a synchronous driver in the standard library; other backends use the async path
(:func:`open_threaded` returns None).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL
from sqlalchemy.pool import StaticPool

T = TypeVar("T")


class ThreadedConnection:
    """A synchronous connection used only from its own thread; :meth:`run` calls ``fn(conn)`` there."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
        self._conn: Connection | None = None

    async def run(self, fn: Callable[[Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call, fn)

    def _call(self, fn: Callable[[Connection], T]) -> T:
        if self._conn is None:
            self._conn = self._engine.connect()
        try:
            return fn(self._conn)
        except Exception:
            # A broken connection must not poison later batches: the next call opens a new one.
            conn, self._conn = self._conn, None
            conn.close()
            raise

    async def aclose(self) -> None:
        def close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            self._engine.dispose()

        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, close)
        self._executor.shutdown(wait=True)


def open_threaded(url: URL, on_connect: Callable[..., None]) -> ThreadedConnection | None:
    """A threaded connection on the database at ``url`` (an async URL): SQLite files and PostgreSQL
    through psycopg (whose one driver is sync and async); None for anything else."""
    if url.drivername == "postgresql+psycopg":
        # The same gain as for SQLite: SQLAlchemy's async layer costs a greenlet switch and an event-loop
        # await per statement; a sync psycopg connection in the writer's thread runs a batch in one hop.
        return ThreadedConnection(create_engine(url, poolclass=StaticPool))
    if url.get_backend_name() != "sqlite":
        return None
    database = url.database or ""
    if not database or database == ":memory:" or database.startswith("file:"):
        return None  # an in-memory database is per connection: a second one would not share it
    # One connection for the life of the writer, never shared between threads by SQLAlchemy itself.
    engine = create_engine(
        url.set(drivername="sqlite"), poolclass=StaticPool, connect_args={"check_same_thread": False}
    )
    event.listen(engine, "connect", on_connect)
    return ThreadedConnection(engine)
