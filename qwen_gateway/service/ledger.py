"""The usage ledger's writer: one task writes every row, in batches (group commit).

Why: a commit per answer, made by whichever request finished, serialised every request behind SQLite's
single write lock (a waiting writer backs off in sleeps of up to 100 ms: the p99 of +450 ms measured at
16 clients), paid a transaction per request, and with SQLite's default ``synchronous=FULL`` an fsync
per answer. Here a request hands its row to one writer task, which takes whatever has queued up
meanwhile and writes it with one statement in one transaction; the request resumes when that commit is
done. No request waits for the database lock, one commit serves the whole batch, and with
``synchronous=NORMAL`` (``store/db.py``) a commit is a write to the WAL, not a disk flush.

Guarantees:

- An answer goes out only after its row is committed (the chat service awaits the sink before it
  finishes the answer). A crash of the process therefore loses no row of an answered request: committed
  rows are in the OS's cache and WAL file. A power loss or kernel crash may undo the batches committed
  since the last WAL checkpoint, whole batches only, never part of one.
- Graceful shutdown (SIGINT/SIGTERM, :meth:`LedgerWriter.aclose`) writes every row handed over,
  including rows of requests cancelled while waiting and rows handed over after closing began (written
  directly).
- A batch that fails is retried row by row, so one bad row (say, a key deleted meanwhile) loses only
  itself; a row that can't be written is logged with its request id and counted in :attr:`lost`.
- Back-pressure: at most ``max_pending`` rows wait; past that :meth:`record` waits for room instead of
  growing memory without bound while the database is stalled.

Money (settlement) goes the same path: the gateway's writer is given ``store/money.py``'s ``settle``,
which in the batch's one transaction inserts the rows and, for each metered one, releases its hold and
charges its cost (the unique request id makes settling twice impossible). Settlement thus costs no
commit of its own, and :meth:`record` returns what the write function returned for the row (the key's
balance after its charge), once that is committed. :meth:`run` runs other short transactions (the
admission hold) on the same connection and thread, so one process's money transactions never wait for
each other's SQLite lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncConnection

from qwen_gateway.store.db import Database, Store, reading, transaction
from qwen_gateway.store.threaded import ThreadedConnection
from qwen_gateway.store.usage import NewUsage, insert_usage, insert_usage_sync

log = logging.getLogger(__name__)

T = TypeVar("T")

# Event-loop turns the writer lets pass between the first item of a batch and taking the batch. Why:
# without them, the batch is taken the moment its first item arrives, so under load (16 streaming
# clients on one core) a batch held ~7 items, and a metered request's hold (one more item than a plain
# request's row) cost about one more transaction, commit and thread hop in seven. Two turns let the
# tasks already ready to run (other requests reaching their hold or their settlement, the I/O the last
# poll found) queue theirs first: batches of ~15 items, half the transactions (measured on the server
# at 16 clients: 555 -> 264 transactions for 2,000 metered streams, 278 -> 129 plain; a third turn
# gained nothing). Each turn costs one pass of the loop (a poll that does not block), microseconds at one
# client, where nothing else is waiting.
GATHER_TURNS = 2
A = TypeVar("A")
R = TypeVar("R")

# Writes one batch in one transaction, all or nothing: ``write(store=..., rows=...)`` on the async
# store, or ``write_sync(conn=..., rows=...)`` on a synchronous connection in the store's worker thread.
# Either may return one result per row (handed to that row's :meth:`LedgerWriter.record`), or None.
BatchWrite = Callable[..., Awaitable[Sequence[Any] | None]]
SyncBatchWrite = Callable[..., Sequence[Any] | None]


@dataclass(slots=True)
class _Pending:
    row: NewUsage | None
    # Resolved when the row's batch is committed; None when nobody waits for it.
    committed: asyncio.Future[Any] | None = None
    # A short transaction's work (the admission hold) run in the batch's transaction instead of a row.
    job: Callable[[Connection], Any] | None = None
    # A job that takes every item of its kind in the batch at once (``run_grouped``): ``group(conn,
    # [arg, ...])`` returns one result per arg, in order.
    group: Callable[[Connection, Sequence[Any]], Sequence[Any]] | None = None
    arg: Any = None


class LedgerWriter:
    """Group-committing writer of ledger rows. Started on first use; :meth:`aclose` flushes it.

    ``write``/``write_sync`` write one batch in one transaction (default: plain ledger rows). On SQLite
    batches go through ``write_sync`` on a connection of the writer's own, in a worker thread (one
    thread hop per batch instead of one per statement, see store/threaded.py); elsewhere through
    ``write`` on the async store.

    With ``in_transaction`` (``fn(conn, rows) -> results``, run inside a transaction the writer
    opens), batches are written by it instead, and the jobs handed to :meth:`run` join the batch: one
    transaction, one commit and (SQLite) one thread hop for every admission and settlement that queued
    up together.
    """

    def __init__(
        self,
        store: Database,
        *,
        max_batch: int = 512,
        max_pending: int = 10_000,
        write: BatchWrite = insert_usage,
        write_sync: SyncBatchWrite | None = insert_usage_sync,
        in_transaction: Callable[[Connection, Sequence[NewUsage]], Sequence[Any]] | None = None,
    ) -> None:
        if max_batch < 1 or max_pending < 1:
            raise ValueError("max_batch and max_pending must be positive")
        self._store = store
        self._max_batch = max_batch
        self._write_async = write
        self._write_sync = write_sync
        self._in_tx = in_transaction
        self._threaded: ThreadedConnection | None = None
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue(maxsize=max_pending)
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.written = 0  # rows committed
        self.lost = 0  # rows that could not be written (each logged with its request id)
        self.batches = 0  # transactions committed

    # -- handing rows over -------------------------------------------------------------------------

    async def record(self, row: NewUsage) -> Any:
        """Hand ``row`` over and return once its batch is committed (with the write function's result for
        it, None if it returns none); raises if it could not be written.

        The commit is shared with every row that queued up meanwhile. Waits for room first while
        ``max_pending`` rows are queued (back-pressure). A caller cancelled while waiting does not take
        its row back: it is still written.
        """
        item = _Pending(row, asyncio.get_running_loop().create_future())
        if self._closing:
            await self._write_now(item)
        else:
            self._ensure_started()
            try:
                self._queue.put_nowait(item)
            except asyncio.QueueFull:
                await self._queue.put(item)
        assert item.committed is not None
        return await item.committed

    async def run(self, fn: Callable[[Connection], T]) -> T:
        """``fn(conn)`` in a transaction on the writer's connection (SQLite: in its worker thread): the
        next batch's, when the writer was given ``in_transaction``, else one of its own. Once the
        transaction is handed over it is committed even if the caller is cancelled meanwhile: a caller
        that must know the outcome awaits :func:`asyncio.shield` of this."""
        if self._in_tx is not None and not self._closing:
            item = _Pending(None, asyncio.get_running_loop().create_future(), job=fn)
            self._ensure_started()
            try:
                self._queue.put_nowait(item)
            except asyncio.QueueFull:
                await self._queue.put(item)
            assert item.committed is not None
            result: T = await item.committed
            return result
        if not self._closing:
            self._ensure_started()
        threaded = self._threaded

        def in_transaction(conn: Connection) -> T:
            with conn.begin():
                return fn(conn)

        if threaded is not None:
            return await threaded.run(in_transaction)
        async with transaction(self._store) as conn:
            return await conn.run_sync(fn)

    async def run_grouped(self, fn: Callable[[Connection, Sequence[A]], Sequence[R]], arg: A) -> R:
        """``fn(conn, [arg])[0]``, where ``fn`` is given every ``arg`` handed over for it that queued up
        for the same batch (in arrival order), in that batch's transaction; else (no ``in_transaction``,
        or closing) in one of its own. Same commit guarantee as :meth:`run`."""
        if self._in_tx is not None and not self._closing:
            item = _Pending(None, asyncio.get_running_loop().create_future(), group=fn, arg=arg)
            self._ensure_started()
            try:
                self._queue.put_nowait(item)
            except asyncio.QueueFull:
                await self._queue.put(item)
            assert item.committed is not None
            result: R = await item.committed
            return result
        return await self.run(lambda conn: fn(conn, [arg])[0])

    def submit_grouped(
        self, fn: Callable[[Connection, Sequence[A]], Sequence[R]], arg: A
    ) -> asyncio.Future[R] | None:
        """:meth:`run_grouped` without a coroutine of its own (no task per call on the hot path): the
        future of the result, or None when it can't be queued at once (queue full, closing, no
        ``in_transaction``): then call :meth:`run_grouped`. The future is resolved once committed; a
        caller that must know the outcome even if cancelled awaits :func:`asyncio.shield` of it."""
        if self._in_tx is None or self._closing:
            return None
        committed: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._ensure_started()
        try:
            self._queue.put_nowait(_Pending(None, committed, group=fn, arg=arg))
        except asyncio.QueueFull:
            return None
        return committed

    def store_connection(self) -> contextlib.AbstractAsyncContextManager[AsyncConnection]:
        """A connection of the writer's store for reads (rolled back on exit)."""
        return reading(self._store)

    async def flush(self) -> None:
        """Wait until every row handed over so far is written (or logged as lost)."""
        if self._task is not None:
            await self._queue.join()

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    async def aclose(self) -> None:
        """Write everything handed over, then stop the writer task. Later rows are written directly."""
        if self._closing:
            return
        self._closing = True
        if self._task is not None:
            # The sentinel queues behind every row already handed over; the task exits after them.
            await self._queue.put(None)
            await self._task
        if self._threaded is not None:
            # Rows handed over from now on take the async path, which needs no thread of ours.
            threaded, self._threaded = self._threaded, None
            await threaded.aclose()
        if self.written or self.lost:
            log.info(
                "ledger: %d rows written in %d transactions, %d lost", self.written, self.batches, self.lost
            )

    # -- the writer task ---------------------------------------------------------------------------

    def _ensure_started(self) -> None:
        if self._task is None:
            if self._write_sync is not None and isinstance(self._store, Store):
                self._threaded = self._store.threaded()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="ledger-writer")

    async def _run(self) -> None:
        queue = self._queue
        while True:
            first = await queue.get()
            batch: list[_Pending] = []
            stop = first is None
            if first is not None:
                batch.append(first)
                # Let the requests that are ready to run hand their work over before the batch is taken
                # (see GATHER_TURNS).
                for _ in range(GATHER_TURNS):
                    await asyncio.sleep(0)
            # Everything that queued up while the previous batch was being written goes in this one.
            while not stop and len(batch) < self._max_batch and not queue.empty():
                item = queue.get_nowait()
                if item is None:
                    stop = True
                else:
                    batch.append(item)
            try:
                if batch:
                    await self._write_batch(batch)
            except Exception:  # never let the writer die: later rows must still be written
                log.exception("ledger writer failed on a batch of %d rows", len(batch))
            finally:
                for _ in range(len(batch) + (1 if stop else 0)):
                    queue.task_done()
            if stop:
                return

    async def _write(self, items: Sequence[_Pending]) -> Sequence[Any] | None:
        """Write a batch in one transaction; returns one result per item (or None: no results)."""
        in_tx = self._in_tx
        if in_tx is not None:
            jobs = [(i, p.job) for i, p in enumerate(items) if p.job is not None]
            rows = [(i, p.row) for i, p in enumerate(items) if p.row is not None]
            groups: dict[Callable[[Connection, Sequence[Any]], Sequence[Any]], list[int]] = {}
            for i, p in enumerate(items):
                if p.group is not None:
                    groups.setdefault(p.group, []).append(i)

            def work(conn: Connection) -> list[Any]:
                out: list[Any] = [None] * len(items)
                for group, indices in groups.items():
                    results = group(conn, [items[i].arg for i in indices])
                    for i, result in zip(indices, results, strict=True):
                        out[i] = result
                for i, job in jobs:
                    out[i] = job(conn)
                if rows:
                    for (i, _), result in zip(rows, in_tx(conn, [r for _, r in rows]), strict=True):
                        out[i] = result
                return out

            threaded = self._threaded
            if threaded is not None:

                def in_transaction(conn: Connection) -> list[Any]:
                    with conn.begin():
                        return work(conn)

                return await threaded.run(in_transaction)
            async with transaction(self._store) as conn:
                return await conn.run_sync(work)
        plain = [p.row for p in items if p.row is not None]
        threaded, write_sync = self._threaded, self._write_sync
        if threaded is None or write_sync is None:
            return await self._write_async(store=self._store, rows=plain)

        def write(conn: Connection) -> Sequence[Any] | None:
            return write_sync(conn=conn, rows=plain)

        return await threaded.run(write)

    async def _write_batch(self, batch: Sequence[_Pending]) -> None:
        try:
            results = await self._write(batch)
        except Exception as exc:
            if len(batch) == 1:
                self._fail(batch[0], exc)
                return
            # One bad row must not cost the others: write them one by one.
            log.warning(
                "ledger batch of %d rows failed (%s); writing them one by one", len(batch), _reason(exc)
            )
            for item in batch:
                await self._write_now(item)
            return
        self.batches += 1
        self.written += sum(1 for p in batch if p.row is not None)
        for i, item in enumerate(batch):
            if item.committed is not None and not item.committed.done():
                item.committed.set_result(None if results is None else results[i])

    async def _write_now(self, item: _Pending) -> None:
        try:
            results = await self._write([item])
        except Exception as exc:
            self._fail(item, exc)
            return
        self.batches += 1
        self.written += 1 if item.row is not None else 0
        if item.committed is not None and not item.committed.done():
            item.committed.set_result(None if results is None else results[0])

    def _fail(self, item: _Pending, exc: Exception) -> None:
        if item.row is None:  # a job: its caller gets the exception
            if item.committed is not None and not item.committed.done():
                item.committed.set_exception(exc)
            return
        self.lost += 1
        log.error(
            "usage row of request %s (model %s, %d+%d tokens, %s) could not be written: %s",
            item.row.request_id,
            item.row.model,
            item.row.prompt_tokens,
            item.row.completion_tokens,
            item.row.status,
            _reason(exc),
        )
        if item.committed is not None and not item.committed.done():
            item.committed.set_exception(exc)


def _reason(exc: Exception) -> str:
    # A database error's text appends the SQL and its parameters; the driver's one-line message is the
    # point (and keeps log lines short).
    orig = getattr(exc, "orig", None)
    return " ".join(str(orig if isinstance(orig, BaseException) else exc).split()) or type(exc).__name__
