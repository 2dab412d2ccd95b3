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
import contextlib
import functools
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL
from sqlalchemy.pool import StaticPool

T = TypeVar("T")


class ThreadedConnection:
    """A synchronous connection used only from its own thread; :meth:`run` calls ``fn(conn)`` there.

    The thread takes work from a plain queue and hands each result back with one
    ``call_soon_threadsafe``. Why not ``loop.run_in_executor``: every call there builds a
    ``concurrent.futures.Future`` (with its own lock and condition), a work item, and an asyncio future
    chained to it by callbacks both ways, and takes the executor's locks, for a thread that never runs
    more than one thing at a time. Work handed over always runs, even if the caller is cancelled
    meanwhile (its result is then dropped): a transaction is never skipped half-way between callers.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._inbox: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._conn: Connection | None = None

    async def run(self, fn: Callable[[Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()
        if self._thread is None:
            # A daemon: one left idle by a caller that never closed it must not keep the process alive.
            self._thread = threading.Thread(target=self._serve, name="store-writer", daemon=True)
            self._thread.start()
        self._inbox.put((functools.partial(self._call, fn), loop, done))
        return await done

    def _serve(self) -> None:
        while (job := self._inbox.get()) is not None:
            work, loop, done = job
            try:
                result = work()
            except BaseException as exc:  # handed to the caller, whatever it is
                _reply(loop, _fail, done, exc)
            else:
                _reply(loop, _succeed, done, result)

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

        if self._thread is None:
            self._engine.dispose()
            return
        # ``close`` is queued behind every call handed over before; the thread ends right after it.
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._inbox.put((close, loop, done))
        self._inbox.put(None)
        await done
        self._thread.join()
        self._thread = None


# What the thread runs, the loop to answer on, and the future it answers.
_Job = tuple[Callable[[], Any], asyncio.AbstractEventLoop, "asyncio.Future[Any]"]


def _reply(loop: asyncio.AbstractEventLoop, how: Callable[..., None], *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
        loop.call_soon_threadsafe(how, *args)


def _succeed(done: asyncio.Future[Any], result: Any) -> None:
    if not done.done():
        done.set_result(result)


def _fail(done: asyncio.Future[Any], exc: BaseException) -> None:
    if not done.done():
        done.set_exception(exc)


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
