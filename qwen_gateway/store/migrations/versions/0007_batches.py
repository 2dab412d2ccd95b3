"""Batches (Batch API) and their lines.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01

Types are spelled out.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("input_file_id", sa.String(64), nullable=False),
        sa.Column("completion_window", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("metadata_json", sa.Text(), nullable=True),
        sa.Column("ds_name", sa.String(512), nullable=True),
        sa.Column("errors_json", sa.Text(), nullable=True),
        sa.Column("output_file_id", sa.String(64), nullable=True),
        sa.Column("error_file_id", sa.String(64), nullable=True),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("completed", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("owner", sa.String(32), nullable=True),
        sa.Column("deadline", _TS, nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("in_progress_at", _TS, nullable=True),
        sa.Column("finalizing_at", _TS, nullable=True),
        sa.Column("completed_at", _TS, nullable=True),
        sa.Column("failed_at", _TS, nullable=True),
        sa.Column("expired_at", _TS, nullable=True),
        sa.Column("cancelling_at", _TS, nullable=True),
        sa.Column("cancelled_at", _TS, nullable=True),
        sa.ForeignKeyConstraint(["key_id"], ["api_keys.id"], name="fk_batches_key_id_api_keys"),
        sa.PrimaryKeyConstraint("id", name="pk_batches"),
    )
    op.create_index("ix_batches_key_id_created_at", "batches", ["key_id", "created_at"])
    op.create_index("ix_batches_status", "batches", ["status"])
    op.create_table(
        "batch_lines",
        sa.Column("batch_id", sa.String(64), nullable=False),
        sa.Column("line", sa.Integer(), nullable=False),
        sa.Column("custom_id", sa.String(512), nullable=True),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("result", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["batch_id"], ["batches.id"], name="fk_batch_lines_batch_id_batches"),
        sa.PrimaryKeyConstraint("batch_id", "line", name="pk_batch_lines"),
        sa.UniqueConstraint("request_id", name="uq_batch_lines_request_id"),
    )
    op.create_index("ix_batch_lines_batch_id_state", "batch_lines", ["batch_id", "state"])


def downgrade() -> None:
    op.drop_index("ix_batch_lines_batch_id_state", table_name="batch_lines")
    op.drop_table("batch_lines")
    op.drop_index("ix_batches_status", table_name="batches")
    op.drop_index("ix_batches_key_id_created_at", table_name="batches")
    op.drop_table("batches")
