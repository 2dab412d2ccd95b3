"""Test databases: a fresh SQLite file or a fresh PostgreSQL database per test.

PostgreSQL is found through ``QWEN_GATEWAY_TEST_POSTGRES_URL`` (``.ci/run`` starts a server and exports
it), else at the URL ``.ci/services.sh`` sets up (``qwen_gateway``@127.0.0.1:5432). Each test gets a
database of its own, created from that server and dropped afterwards, so no test sees another's rows.
Without a reachable server the PostgreSQL cases are skipped, saying why, except under CI (``CI=true``),
where they fail: CI must run them.

Use the ``db_url`` fixture (parametrized over both backends by :func:`backends`) or the helpers below.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from functools import cache

import pytest

# Where .ci/services.sh puts the test role; the environment variable wins.
DEFAULT_POSTGRES_URL = "postgresql://qwen_gateway:qwen_gateway@127.0.0.1:5432/postgres"
POSTGRES_ENV = "QWEN_GATEWAY_TEST_POSTGRES_URL"

# Every test database carries this prefix, so a leftover from a killed run is recognisable.
DB_PREFIX = "qgw_test_"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def postgres_admin_url() -> str:
    return os.environ.get(POSTGRES_ENV) or DEFAULT_POSTGRES_URL


@cache
def postgres_unavailable() -> str | None:
    """Why PostgreSQL can't be used here (None: it can). Checked once per test run."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed"
    url = _libpq_url(postgres_admin_url())
    try:
        with psycopg.connect(url, connect_timeout=5, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return (
            f"no PostgreSQL server at {_shown(url)} ({first}); run `. .ci/services.sh` or set {POSTGRES_ENV}"
        )
    return None


def require_postgres() -> None:
    """Skip the calling test when there is no PostgreSQL server, or fail it under CI."""
    reason = postgres_unavailable()
    if reason is None:
        return
    if in_ci():
        pytest.fail(f"{reason}; CI must run the PostgreSQL tests")
    pytest.skip(reason)


@cache
def _admin_parts() -> tuple[str, str]:
    base = postgres_admin_url()
    head, _, _ = base.rpartition("/")
    return base, head


def create_postgres_database() -> str:
    """A new, empty database on the test server; returns its URL (``postgresql://...``)."""
    import psycopg

    require_postgres()
    name = DB_PREFIX + secrets.token_hex(6)
    base, head = _admin_parts()
    with psycopg.connect(_libpq_url(base), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{head}/{name}"


def drop_postgres_database(url: str) -> None:
    import psycopg

    name = url.rpartition("/")[2]
    assert name.startswith(DB_PREFIX), url
    base, _ = _admin_parts()
    with psycopg.connect(_libpq_url(base), autocommit=True) as conn:
        try:
            # FORCE: a server a test started (or a pool not yet disposed) may still hold a connection.
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except psycopg.errors.InsufficientPrivilege:
            # FORCE signals every backend in the database, and an autovacuum worker that happens to be
            # in it is not ours to signal: PostgreSQL then refuses the whole DROP ("must be a member of
            # the role whose process is being terminated"), a flake seen in the store tests' teardown.
            # So end our own role's connections, then DROP without FORCE: that one stops autovacuum
            # workers itself and waits (up to 5 s) for the terminated backends to be gone.
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND usename = current_user AND pid <> pg_backend_pid()",
                (name,),
            )
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test (skipped without a server, failed under CI)."""
    url = create_postgres_database()
    try:
        yield url
    finally:
        drop_postgres_database(url)


@contextlib.contextmanager
def database_for(backend: str) -> Iterator[str | None]:
    """For servers and the CLI: None on SQLite (the home's own file), else a fresh PostgreSQL database's
    URL (``postgresql://...``), dropped on exit."""
    if backend == "sqlite":
        yield None
        return
    url = create_postgres_database()
    try:
        yield url
    finally:
        drop_postgres_database(url)


BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Parametrizes a test over both databases (ids ``[sqlite]`` and ``[postgresql]``)."""
    return str(request.param)


@pytest.fixture
def db_url(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An async SQLAlchemy URL of an empty database of this test's backend."""
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('db') / 'data' / 'gateway.db'}"
        return
    url = create_postgres_database()
    try:
        yield url.replace("postgresql://", "postgresql+psycopg://", 1)
    finally:
        drop_postgres_database(url)


def _libpq_url(url: str) -> str:
    # psycopg takes libpq URLs; a SQLAlchemy driver suffix (postgresql+psycopg://) is not one.
    scheme, sep, rest = url.partition("://")
    return "postgresql://" + rest if sep and scheme.startswith("postgres") else url


def _shown(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at:
        return url
    user = creds.partition(":")[0]
    return f"{scheme}{sep}{user}:***@{host}"
