"""when each participant last sent a stage message

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 23:55:00

Key-agreement stages may close before their deadline once most live participants answered and
the rest stayed quiet for a while (``DeadlineSettings.quiet_seconds``): that needs the time of
the newest answer, kept in the participant row the answer already writes.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("participants") as batch:
        batch.add_column(sa.Column("message_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("participants") as batch:
        batch.drop_column("message_at")
