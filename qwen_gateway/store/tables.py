"""The schema, as SQLAlchemy Core tables. Migrations (``store/migrations``) must produce exactly this.

Column types are portable on purpose (TEXT/VARCHAR, INTEGER/BIGINT, NUMERIC, TIMESTAMP WITH TIME ZONE) so
the same schema runs on SQLite today and PostgreSQL later. ``tests/unit/store`` checks that a database
migrated to head matches this metadata.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    TypeDecorator,
)

# Explicit constraint names: PostgreSQL migrations that later drop or alter a constraint need to know its
# name, and SQLite (batch mode) needs them to recreate tables. The store also reads the unique-constraint
# name out of PostgreSQL's IntegrityError message (see store/keys.py).
NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Money: 20 digits, 8 after the point (prices per 1K tokens go down to 1e-5 CNY). PostgreSQL stores it
# exactly; SQLite stores NUMERIC as REAL, which SQLAlchemy rounds back to 8 places on read.
MONEY = Numeric(20, 8)


class UtcDateTime(TypeDecorator[datetime]):
    """An aware UTC datetime in and out, whatever the backend keeps.

    SQLite has no time zones: SQLAlchemy writes the wall-clock fields and reads back a naive datetime, so
    values are converted to UTC before writing and tagged as UTC after reading.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; pass an aware (UTC) datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = MetaData(naming_convention=NAMING_CONVENTION)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(32), primary_key=True),  # "key_" + 12 hex
    Column("name", String(200), nullable=False, unique=True),
    Column("prefix", String(16), nullable=False),  # first characters of the key, for display only
    Column("key_hash", String(64), nullable=False, unique=True),  # hex SHA-256 of the whole key
    Column("created_at", UtcDateTime(), nullable=False),
    Column("revoked_at", UtcDateTime(), nullable=True),
    # NULL: unmetered. A later issue debits it.
    Column("balance", MONEY, nullable=True),
)

usage_ledger = Table(
    "usage_ledger",
    metadata,
    # BIGINT on PostgreSQL; SQLite only auto-increments a column declared exactly "INTEGER PRIMARY KEY".
    Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True),
    Column("request_id", String(64), nullable=False),
    # NULL when the request was served without an API key.
    Column("key_id", String(32), ForeignKey("api_keys.id"), nullable=True),
    Column("model", String(200), nullable=False),
    Column("endpoint", String(64), nullable=False),
    Column("prompt_tokens", Integer(), nullable=False),
    Column("completion_tokens", Integer(), nullable=False),
    Column("total_tokens", Integer(), nullable=False),
    Column("cost", MONEY, nullable=True),  # NULL: not priced
    Column("status", String(16), nullable=False),  # "ok" | "error" | "cancelled"
    Column("created_at", UtcDateTime(), nullable=False),
)

Index(None, usage_ledger.c.key_id, usage_ledger.c.created_at)
Index(None, usage_ledger.c.request_id)
