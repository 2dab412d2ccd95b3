"""Usage source: whether a ledger row's token counts came from the engine or were counted by the
gateway itself (an upstream that reported no usage, or a stream cut short).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

Frozen, like the ones before. Types are spelled out.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("usage_ledger") as batch:
        batch.add_column(sa.Column("usage_source", sa.String(16), nullable=False, server_default="engine"))


def downgrade() -> None:
    with op.batch_alter_table("usage_ledger") as batch:
        batch.drop_column("usage_source")
