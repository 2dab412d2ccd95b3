"""API keys and the usage ledger.

Revision ID: 0001
Revises:
Create Date: 2025-01-01

Frozen: later schema changes go in new revisions, never here. Types are spelled out rather than imported
from ``store/tables.py`` so this file keeps describing the schema as it was.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("balance", sa.Numeric(20, 8), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
        sa.UniqueConstraint("name", name="uq_api_keys_name"),
        sa.UniqueConstraint("key_hash", name="uq_api_keys_key_hash"),
    )
    op.create_table(
        "usage_ledger",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=True),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("total_tokens", sa.Integer(), nullable=False),
        sa.Column("cost", sa.Numeric(20, 8), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_usage_ledger"),
        sa.ForeignKeyConstraint(["key_id"], ["api_keys.id"], name="fk_usage_ledger_key_id_api_keys"),
    )
    op.create_index("ix_usage_ledger_key_id_created_at", "usage_ledger", ["key_id", "created_at"])
    op.create_index("ix_usage_ledger_request_id", "usage_ledger", ["request_id"])


def downgrade() -> None:
    op.drop_index("ix_usage_ledger_request_id", table_name="usage_ledger")
    op.drop_index("ix_usage_ledger_key_id_created_at", table_name="usage_ledger")
    op.drop_table("usage_ledger")
    op.drop_table("api_keys")
