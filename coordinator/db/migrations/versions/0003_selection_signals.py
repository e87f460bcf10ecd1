"""selection signals per device (oort)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 06:05:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("util_loss", sa.Float(), nullable=True))
        batch.add_column(sa.Column("util_round", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("util_seconds", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("util_seconds")
        batch.drop_column("util_round")
        batch.drop_column("util_loss")
