"""Price overrides: per-model prices set at runtime (admin API / console), and their audit trail.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01

Frozen, like 0001-0003. Types are spelled out.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "price_overrides",
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("input_micro", sa.BigInteger(), nullable=False),
        sa.Column("output_micro", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.Column("updated_by", sa.String(32), nullable=False),
        sa.PrimaryKeyConstraint("model", name="pk_price_overrides"),
    )
    op.create_table(
        "price_changes",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("old_input_micro", sa.BigInteger(), nullable=False),
        sa.Column("old_output_micro", sa.BigInteger(), nullable=False),
        sa.Column("new_input_micro", sa.BigInteger(), nullable=False),
        sa.Column("new_output_micro", sa.BigInteger(), nullable=False),
        sa.Column("reset", sa.Boolean(), nullable=False),
        sa.Column("admin_key_id", sa.String(32), nullable=False),
        sa.Column("changed_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_price_changes"),
    )
    op.create_index("ix_price_changes_changed_at", "price_changes", ["changed_at"])


def downgrade() -> None:
    op.drop_index("ix_price_changes_changed_at", table_name="price_changes")
    op.drop_table("price_changes")
    op.drop_table("price_overrides")
