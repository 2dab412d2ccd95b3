"""Hold endpoint: the endpoint a held request came in on, so that the "expired" ledger row written
for the hold of a process that died says where the request was made (it said ``chat.completions``
for every one).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01

Frozen, like the ones before. Types are spelled out. Nullable: holds of a process that ran the
previous code have none, and are ledgered as ``chat.completions`` as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("holds") as batch:
        batch.add_column(sa.Column("endpoint", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("holds") as batch:
        batch.drop_column("endpoint")
