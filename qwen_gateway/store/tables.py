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
    Boolean,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
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

# Money is integer micro-units of CNY (1 CNY = 1_000_000) wherever it is stored or summed: exact on every
# backend (SQLite has no exact decimal type: it keeps NUMERIC as a REAL) and summed without rounding.
MICRO = BigInteger()


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
    # NULL: unmetered. Otherwise what the key may still spend, holds of running requests already taken
    # out (service/money).
    Column("balance_micro", MICRO, nullable=True),
    # Requests / tokens per minute; NULL: no limit.
    Column("rpm_limit", Integer(), nullable=True),
    Column("tpm_limit", BigInteger(), nullable=True),
    # Written first by every admission of a limited key: it takes the write lock (SQLite) or the key's
    # row lock (PostgreSQL) before the window is read, so two processes can't both pass one check.
    Column("last_used_at", UtcDateTime(), nullable=True),
)

usage_ledger = Table(
    "usage_ledger",
    metadata,
    # BIGINT on PostgreSQL; SQLite only auto-increments a column declared exactly "INTEGER PRIMARY KEY".
    Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True),
    # Unique: a request is settled once; a second settlement of it fails as a whole (no double charge).
    Column("request_id", String(64), nullable=False, unique=True),
    # NULL when the request was served without an API key.
    Column("key_id", String(32), ForeignKey("api_keys.id"), nullable=True),
    Column("model", String(200), nullable=False),
    Column("endpoint", String(64), nullable=False),
    Column("prompt_tokens", Integer(), nullable=False),
    Column("completion_tokens", Integer(), nullable=False),
    Column("total_tokens", Integer(), nullable=False),
    # Of completion_tokens / prompt_tokens: the split reported by the engine.
    Column("reasoning_tokens", Integer(), nullable=False, server_default="0"),
    Column("image_tokens", Integer(), nullable=False, server_default="0"),
    Column("video_tokens", Integer(), nullable=False, server_default="0"),
    # What the key was charged; NULL: unmetered (not charged).
    Column("cost_micro", MICRO, nullable=True),
    Column("status", String(16), nullable=False),  # "ok" | "error" | "cancelled" | "expired"
    Column("latency_ms", Integer(), nullable=True),
    Column("created_at", UtcDateTime(), nullable=False),
    # "engine": the counts are the engine's report; "local": the gateway counted them with the model's
    # tokenizer (an upstream that reported no usage, or a stream cut short before its report).
    Column("usage_source", String(16), nullable=False, server_default="engine"),
)

Index(None, usage_ledger.c.key_id, usage_ledger.c.created_at)
Index(None, usage_ledger.c.created_at)

# The money a running request of a metered key has taken out of its balance until it is settled. The
# row goes in the admission's transaction and out in the settlement's (with the ledger row), so at any
# moment: balance + open holds + ledger costs = what was put in. ``owner`` is the server process that
# runs the request: a dead owner's holds are released (service/money/meter.py).
holds = Table(
    "holds",
    metadata,
    Column("request_id", String(64), primary_key=True),
    Column("key_id", String(32), ForeignKey("api_keys.id"), nullable=False),
    Column("amount_micro", MICRO, nullable=False),
    Column("model", String(200), nullable=False),
    Column("owner", String(32), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    # Where the request came in (the ledger's endpoint), for the "expired" row of a dead process's
    # hold; NULL in holds taken before migration 0008.
    Column("endpoint", String(64), nullable=True),
)

Index(None, holds.c.owner)

# The sliding minute the RPM and TPM limits count, in one-second buckets per rate-limited key (at most
# 60 rows per key, whatever its rate): requests admitted in that second, and their tokens (at their hold
# estimate while they run, corrected to their real count when they are settled).
rate_windows = Table(
    "rate_windows",
    metadata,
    Column("key_id", String(32), ForeignKey("api_keys.id"), primary_key=True),
    Column("second", BigInteger(), primary_key=True),  # epoch seconds
    Column("requests", Integer(), nullable=False),
    Column("tokens", BigInteger(), nullable=False),
)

# Server processes using this database, for telling a running request's hold from a crashed one's.
gateway_instances = Table(
    "gateway_instances",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("hostname", String(255), nullable=False),
    Column("pid", Integer(), nullable=False),
    Column("started_at", UtcDateTime(), nullable=False),
    Column("heartbeat_at", UtcDateTime(), nullable=False),
)

# Ledger rows older than the retention, rolled up: sums per UTC day, key, model and status (exact: every
# column is an integer sum). ``key_id`` is "" for requests served without a key (a primary key column
# can't be NULL on PostgreSQL); no foreign key, so a roll-up outlives nothing it refers to.
usage_daily = Table(
    "usage_daily",
    metadata,
    Column("day", String(10), primary_key=True),  # "YYYY-MM-DD" (UTC)
    Column("key_id", String(32), primary_key=True),
    Column("model", String(200), primary_key=True),
    Column("status", String(16), primary_key=True),
    Column("requests", BigInteger(), nullable=False),
    Column("prompt_tokens", BigInteger(), nullable=False),
    Column("completion_tokens", BigInteger(), nullable=False),
    Column("reasoning_tokens", BigInteger(), nullable=False),
    Column("image_tokens", BigInteger(), nullable=False),
    Column("video_tokens", BigInteger(), nullable=False),
    Column("cost_micro", MICRO, nullable=False),
    Column("latency_ms", BigInteger(), nullable=False),  # summed
)

# Keys of the admin API and console (``qwen-gateway admin-key create``). A table of their own, not a flag
# on api_keys: an admin key can never be used as an API key nor the other way round, whatever a query
# forgets to filter.
admin_keys = Table(
    "admin_keys",
    metadata,
    Column("id", String(32), primary_key=True),  # "adm_" + 12 hex
    Column("name", String(200), nullable=False, unique=True),
    Column("prefix", String(16), nullable=False),  # first characters of the key, for display only
    Column("key_hash", String(64), nullable=False, unique=True),  # hex SHA-256 of the whole key
    Column("created_at", UtcDateTime(), nullable=False),
    Column("revoked_at", UtcDateTime(), nullable=True),
)

# Uploaded files (service/files.py). The bytes and the extracted text live on disk under the files
# directory, named by ``id``; a row exists from the moment an upload is complete (``processing`` while
# its text is extracted) and is deleted with the files. ``key_id`` scopes every read: a key sees only its
# own files.
files = Table(
    "files",
    metadata,
    Column("id", String(64), primary_key=True),  # "file-fe-…" / "file-batch-…" (24 hex)
    Column("key_id", String(32), ForeignKey("api_keys.id"), nullable=False),
    Column("filename", String(512), nullable=False),
    Column("purpose", String(32), nullable=False),  # "file-extract" | "batch"
    Column("bytes", BigInteger(), nullable=False),
    Column("status", String(16), nullable=False),  # "processing" | "processed"
    Column("pages", Integer(), nullable=True),
    Column("text_chars", BigInteger(), nullable=True),
    Column("created_at", UtcDateTime(), nullable=False),
)

Index(None, files.c.key_id, files.c.created_at)
# Prices set at runtime through the admin API, one row per model: they win over the catalog's and the
# ``[[models]]`` entry's price (which stay the default a reset goes back to). Every server process
# sharing the database reads them (service/money/meter.py refreshes them every few seconds).
price_overrides = Table(
    "price_overrides",
    metadata,
    Column("model", String(200), primary_key=True),
    Column("input_micro", MICRO, nullable=False),  # micro-CNY per 1K tokens
    Column("output_micro", MICRO, nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
    Column("updated_by", String(32), nullable=False),  # admin key id
)

# The audit trail of price changes: who changed which model's price from what to what, and when
# (``reset``: the override was removed and the default applies again). Never updated or deleted.
price_changes = Table(
    "price_changes",
    metadata,
    Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True),
    Column("model", String(200), nullable=False),
    Column("old_input_micro", MICRO, nullable=False),
    Column("old_output_micro", MICRO, nullable=False),
    Column("new_input_micro", MICRO, nullable=False),
    Column("new_output_micro", MICRO, nullable=False),
    Column("reset", Boolean(), nullable=False),
    Column("admin_key_id", String(32), nullable=False),
    Column("changed_at", UtcDateTime(), nullable=False),
)

Index(None, price_changes.c.changed_at)

# Batches of the Batch API (service/batches.py). ``owner`` is the server process running the batch (a
# ``gateway_instances`` id): a batch whose owner is gone is taken over by the next process that starts.
# ``deadline`` is ``created_at`` plus the completion window (the object's ``expires_at`` stays null, as
# DashScope shows it). Counts and timestamps are the object's ``request_counts`` and ``*_at``.
batches = Table(
    "batches",
    metadata,
    Column("id", String(64), primary_key=True),  # "batch_" + uuid
    Column("key_id", String(32), ForeignKey("api_keys.id"), nullable=False),
    Column("endpoint", String(64), nullable=False),
    Column("input_file_id", String(64), nullable=False),
    Column("completion_window", String(16), nullable=False),
    # validating | in_progress | finalizing | completed | failed | cancelling | cancelled | expired
    Column("status", String(16), nullable=False),
    Column("metadata_json", Text(), nullable=True),
    Column("ds_name", String(512), nullable=True),  # metadata's ds_name, for the list's filter
    Column("errors_json", Text(), nullable=True),  # the validation errors of a failed batch
    Column("output_file_id", String(64), nullable=True),
    Column("error_file_id", String(64), nullable=True),
    Column("total", Integer(), nullable=False),
    Column("completed", Integer(), nullable=False),
    Column("failed", Integer(), nullable=False),
    Column("owner", String(32), nullable=True),
    Column("deadline", UtcDateTime(), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("in_progress_at", UtcDateTime(), nullable=True),
    Column("finalizing_at", UtcDateTime(), nullable=True),
    Column("completed_at", UtcDateTime(), nullable=True),
    Column("failed_at", UtcDateTime(), nullable=True),
    Column("expired_at", UtcDateTime(), nullable=True),
    Column("cancelling_at", UtcDateTime(), nullable=True),
    Column("cancelled_at", UtcDateTime(), nullable=True),
)

Index(None, batches.c.key_id, batches.c.created_at)
Index(None, batches.c.status)

# One row per request line of a batch, written when the batch is validated. ``request_id`` is derived
# from the batch id and the line number (the same on every attempt): it is the line's usage-ledger
# request id, whose uniqueness makes a second charge of a line impossible. ``result`` is the line's
# output- or error-file line, written in the same transaction as its charge.
batch_lines = Table(
    "batch_lines",
    metadata,
    Column("batch_id", String(64), ForeignKey("batches.id"), primary_key=True),
    Column("line", Integer(), primary_key=True),  # 1-based, as DashScope's errors count
    Column("custom_id", String(512), nullable=True),
    Column("request_id", String(64), nullable=False, unique=True),
    Column("body", Text(), nullable=False),  # the line's request body (JSON)
    Column("state", String(16), nullable=False),  # pending | running | done | failed
    Column("result", Text(), nullable=True),
    Column("attempts", Integer(), nullable=False),
)

Index(None, batch_lines.c.batch_id, batch_lines.c.state)
