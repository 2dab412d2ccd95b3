"""Money: balances and costs in integer micro-units, rate limits, holds, the rate windows, instances and
daily roll-ups; the ledger's request id becomes unique.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

Frozen, like 0001. Types are spelled out. ``balance``/``cost`` (NUMERIC, never written by 0001's code
but converted anyway) become ``balance_micro``/``cost_micro`` (BIGINT, rounded to the micro-unit).
Batch mode lets SQLite drop and add columns (it recreates the table); PostgreSQL alters in place.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("balance_micro", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("rpm_limit", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("tpm_limit", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("last_used_at", _TS, nullable=True))
    op.execute(
        "UPDATE api_keys SET balance_micro = CAST(ROUND(balance * 1000000) AS BIGINT) "
        "WHERE balance IS NOT NULL"
    )
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("balance")

    with op.batch_alter_table("usage_ledger") as batch:
        batch.add_column(sa.Column("reasoning_tokens", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("image_tokens", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("video_tokens", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("cost_micro", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("latency_ms", sa.Integer(), nullable=True))
    op.execute(
        "UPDATE usage_ledger SET cost_micro = CAST(ROUND(cost * 1000000) AS BIGINT) WHERE cost IS NOT NULL"
    )
    with op.batch_alter_table("usage_ledger") as batch:
        batch.drop_column("cost")
        batch.drop_index("ix_usage_ledger_request_id")
        batch.create_unique_constraint("uq_usage_ledger_request_id", ["request_id"])
        batch.create_index("ix_usage_ledger_created_at", ["created_at"])

    op.create_table(
        "holds",
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("amount_micro", sa.BigInteger(), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("owner", sa.String(32), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("request_id", name="pk_holds"),
        sa.ForeignKeyConstraint(["key_id"], ["api_keys.id"], name="fk_holds_key_id_api_keys"),
    )
    op.create_index("ix_holds_owner", "holds", ["owner"])
    op.create_table(
        "rate_windows",
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("second", sa.BigInteger(), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("key_id", "second", name="pk_rate_windows"),
        sa.ForeignKeyConstraint(["key_id"], ["api_keys.id"], name="fk_rate_windows_key_id_api_keys"),
    )
    op.create_table(
        "gateway_instances",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", _TS, nullable=False),
        sa.Column("heartbeat_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_gateway_instances"),
    )
    op.create_table(
        "usage_daily",
        sa.Column("day", sa.String(10), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.Column("reasoning_tokens", sa.BigInteger(), nullable=False),
        sa.Column("image_tokens", sa.BigInteger(), nullable=False),
        sa.Column("video_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cost_micro", sa.BigInteger(), nullable=False),
        sa.Column("latency_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("day", "key_id", "model", "status", name="pk_usage_daily"),
    )


def downgrade() -> None:
    op.drop_table("usage_daily")
    op.drop_table("gateway_instances")
    op.drop_table("rate_windows")
    op.drop_index("ix_holds_owner", table_name="holds")
    op.drop_table("holds")
    with op.batch_alter_table("usage_ledger") as batch:
        batch.add_column(sa.Column("cost", sa.Numeric(20, 8), nullable=True))
    op.execute("UPDATE usage_ledger SET cost = cost_micro / 1000000.0 WHERE cost_micro IS NOT NULL")
    with op.batch_alter_table("usage_ledger") as batch:
        batch.drop_index("ix_usage_ledger_created_at")
        batch.drop_constraint("uq_usage_ledger_request_id", type_="unique")
        batch.create_index("ix_usage_ledger_request_id", ["request_id"])
        for column in ("latency_ms", "cost_micro", "video_tokens", "image_tokens", "reasoning_tokens"):
            batch.drop_column(column)
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("balance", sa.Numeric(20, 8), nullable=True))
    op.execute("UPDATE api_keys SET balance = balance_micro / 1000000.0 WHERE balance_micro IS NOT NULL")
    with op.batch_alter_table("api_keys") as batch:
        for column in ("last_used_at", "tpm_limit", "rpm_limit", "balance_micro"):
            batch.drop_column(column)
