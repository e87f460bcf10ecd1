"""privacy accounting: per-round charges and why a task stopped

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 05:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("status_reason", sa.String(length=512), nullable=True))
    with op.batch_alter_table("rounds") as batch:
        batch.add_column(sa.Column("dp_q", sa.Float(), nullable=True))
        batch.add_column(sa.Column("dp_z", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("rounds") as batch:
        batch.drop_column("dp_z")
        batch.drop_column("dp_q")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("status_reason")
