"""The database handle: an async SQLAlchemy engine, migrated to head when opened.

Repository functions (``store/keys.py``, ``store/usage.py``) take a :data:`Database`: either the
:class:`Store` (each call runs in its own transaction) or an :class:`AsyncConnection` already inside a
transaction (the call joins it, so a caller can e.g. debit a balance and record usage atomically).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeAlias

from sqlalchemy import Connection, Table, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from qwen_gateway.errors import StartupError
from qwen_gateway.store.threaded import ThreadedConnection, open_threaded

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# How long a SQLite writer waits for another process's write lock (the CLI and a running server share
# one file) before failing with "database is locked".
SQLITE_BUSY_TIMEOUT_MS = 10_000

# In WAL mode, NORMAL syncs the WAL only at checkpoints, not on every commit. A committed transaction
# still survives a crash of the process (its pages are in the OS's cache, written to the WAL file); what
# a power loss or kernel crash can undo is the last transactions since the last checkpoint, and the file
# stays consistent either way (a balance change and its ledger row are lost together or kept together).
# FULL would put one fsync (measured several ms, far more on a busy disk) on every commit.
SQLITE_SYNCHRONOUS = "NORMAL"


class Store:
    """The gateway's database. Build with :meth:`open`; close with :meth:`aclose` (or ``async with``)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    @classmethod
    async def open(cls, url: str, *, migrate: bool = True) -> Store:
        """Connect to ``url`` (an async SQLAlchemy URL) and run migrations to head.

        A plain ``sqlite:///`` URL is upgraded to the aiosqlite driver, a plain ``postgresql://`` one
        to psycopg (3). For a SQLite file the parent
        directory is created. Any failure is a :class:`StartupError` with a one-line message.
        """
        try:
            parsed = _async_url(make_url(url))
        except ArgumentError:
            # Not echoed: a malformed URL may still hold a password.
            raise StartupError(
                "invalid database URL (expected e.g. sqlite+aiosqlite:////path/to/gateway.db)"
            ) from None
        shown = parsed.render_as_string(hide_password=True)
        try:
            _prepare_sqlite_file(parsed)
            engine = create_async_engine(parsed)
        except (NoSuchModuleError, ImportError, OSError, SQLAlchemyError) as exc:
            raise StartupError(f"cannot open database {shown}: {_one_line(exc)}") from None
        if parsed.get_backend_name() == "sqlite":
            event.listen(engine.sync_engine, "connect", _sqlite_on_connect)
        store = cls(engine)
        if migrate:
            try:
                await store.migrate()
            except BaseException as exc:
                await engine.dispose()
                if isinstance(exc, Exception) and not isinstance(exc, StartupError):
                    raise StartupError(f"cannot migrate database {shown}: {_one_line(exc)}") from None
                raise
        return store

    async def migrate(self) -> None:
        """Upgrade the schema to the newest revision shipped with this package."""
        # Alembic is synchronous; run_sync hands it a sync facade over our own async connection (the
        # Alembic "asyncio" cookbook), so no second, synchronous driver is needed for any backend.
        async with self._engine.begin() as conn:
            await conn.run_sync(_upgrade_to_head)

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    def threaded(self) -> ThreadedConnection | None:
        """A synchronous connection of its own in a worker thread, for batched writes (SQLite only;
        None otherwise). The caller closes it."""
        return open_threaded(self._engine.url, _sqlite_on_connect)

    def connect(self) -> contextlib.AbstractAsyncContextManager[AsyncConnection]:
        """A connection for reads (rolled back on exit)."""
        return self._engine.connect()

    def begin(self) -> contextlib.AbstractAsyncContextManager[AsyncConnection]:
        """A connection inside a transaction, committed on a clean exit and rolled back on an error."""
        return self._engine.begin()

    async def aclose(self) -> None:
        await self._engine.dispose()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


Database: TypeAlias = Store | AsyncConnection


@contextlib.asynccontextmanager
async def transaction(db: Database) -> AsyncIterator[AsyncConnection]:
    """A connection in a transaction: a new one from a Store, or the caller's own (which the caller ends)."""
    if isinstance(db, AsyncConnection):
        yield db
        return
    async with db.begin() as conn:
        yield conn


async def insert_unless_taken(db: Database, table: Table, values: Mapping[str, Any], *, unique: str) -> bool:
    """Insert one row into ``table``; False (nothing written) when its ``unique`` column's value is taken.

    Inserting first and classifying the failure (rather than checking beforehand) keeps this one
    statement, so two concurrent writers can't both pass a check. The message names the column (SQLite:
    "UNIQUE constraint failed: api_keys.name") or the constraint (PostgreSQL: "uq_api_keys_name", see
    tables.NAMING_CONVENTION)."""
    try:
        async with transaction(db) as conn:
            await conn.execute(table.insert().values(**values))
    except IntegrityError as exc:
        message = str(exc.orig)
        if f"{table.name}.{unique}" in message or f"uq_{table.name}_{unique}" in message:
            return False
        raise
    return True


@contextlib.asynccontextmanager
async def reading(db: Database) -> AsyncIterator[AsyncConnection]:
    """A connection for reads: a new one from a Store, or the caller's own."""
    if isinstance(db, AsyncConnection):
        yield db
        return
    async with db.connect() as conn:
        yield conn


# Plain URLs get the driver the gateway ships with. For PostgreSQL that is psycopg 3: one driver that is
# both async (the server's engine) and sync (Alembic's CLI, a worker-thread connection like SQLite's
# batched writer), where asyncpg would cover only the first and need a second driver for the rest.
_DEFAULT_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+psycopg",
    "postgres": "postgresql+psycopg",  # the spelling Heroku and libpq's docs also use
}


def _async_url(url: URL) -> URL:
    driver = _DEFAULT_DRIVERS.get(url.drivername)
    return url if driver is None else url.set(drivername=driver)


def _prepare_sqlite_file(url: URL) -> None:
    if url.get_backend_name() != "sqlite":
        return
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the server keep reading while the CLI writes (and vice versa); the busy timeout makes a
    # second writer wait instead of failing at once; SQLite leaves foreign keys off unless asked.
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={SQLITE_SYNCHRONOUS}")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


# Any constant both processes agree on: the key of the advisory lock that serialises migrations.
_MIGRATION_LOCK_KEY = 0x7177_656E_6777  # "qwengw"


def _upgrade_to_head(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        # Two servers starting at once on one database would both see an old schema and both create
        # the same tables; the second one's CREATE fails. The lock (released at commit) makes the
        # second wait, then find the schema at head. PostgreSQL's DDL is transactional, so the first
        # one's changes appear all at once.
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
    elif connection.dialect.name == "sqlite":
        # Python's sqlite3 driver (under aiosqlite too) opens a transaction only before DML, so
        # Alembic's DDL would commit statement by statement: a migration that fails half-way (a full
        # disk, a kill) would leave a half-changed schema that no later start can migrate. An explicit
        # BEGIN makes the whole upgrade one transaction (SQLite's DDL is transactional), and IMMEDIATE
        # takes the write lock first, so two processes starting at once migrate one after the other.
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    with _alembic_quiet():
        # Imported here (and quietly: importing alembic.command logs its plugin setup at INFO).
        from alembic import command
        from alembic.config import Config
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory
        from alembic.util.exc import CommandError

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        # env.py migrates on this connection instead of building an engine from a URL.
        config.attributes["connection"] = connection
        heads = set(ScriptDirectory.from_config(config).get_heads())
        current = set(MigrationContext.configure(connection).get_current_heads())
        if current == heads:
            return
        try:
            command.upgrade(config, "head")
        except CommandError as exc:
            # Typically: the database was migrated by a newer qwen-gateway than this one.
            raise StartupError(f"database schema: {_one_line(exc)}") from None
    log.info("database schema upgraded from %s to %s", _revisions(current), _revisions(heads))


@contextlib.contextmanager
def _alembic_quiet() -> Iterator[None]:
    """Alembic logs a dozen INFO lines per start (plugins, context impl); show them only when debugging."""
    logger = logging.getLogger("alembic")
    if logger.isEnabledFor(logging.DEBUG):
        yield
        return
    previous = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(previous)


def _revisions(revisions: set[str]) -> str:
    return ", ".join(sorted(revisions)) or "(empty)"


def _one_line(exc: BaseException) -> str:
    # A DBAPIError's own text appends the SQL and a documentation link; the driver's message is the point.
    orig = getattr(exc, "orig", None)
    text = " ".join(str(orig if isinstance(orig, BaseException) else exc).split())
    return text or type(exc).__name__
