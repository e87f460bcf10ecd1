"""per-participant secure-aggregation messages and uploads

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 20:30:00

Until 0003 every secure-aggregation message rewrote the round's whole server state (and every
upload its running sum) under the round's row lock. Messages now live in their participant's
row and are replayed into the server state once per stage; uploads append their verified
body to ``round_uploads`` (no shared row to lock), summed in one pass when the stage closes.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("participants") as batch:
        batch.add_column(sa.Column("secagg_msg", sa.LargeBinary(), nullable=True))
    with op.batch_alter_table("rounds") as batch:
        batch.drop_column("sum_blob")
        batch.drop_column("weight_sum")
    op.create_table(
        "round_uploads",
        sa.Column("round_id", sa.Integer(), sa.ForeignKey("rounds.id"), primary_key=True),
        sa.Column("device_id", sa.String(32), sa.ForeignKey("devices.id"), primary_key=True),
        sa.Column("weight", sa.Float(), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
    )
    if op.get_bind().dialect.name == "postgresql":
        # masked updates are incompressible: store them out of line without trying pglz
        op.execute("ALTER TABLE round_uploads ALTER COLUMN body SET STORAGE EXTERNAL")


def downgrade() -> None:
    op.drop_table("round_uploads")
    with op.batch_alter_table("rounds") as batch:
        batch.add_column(sa.Column("weight_sum", sa.Float(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("sum_blob", sa.LargeBinary(), nullable=True))
    with op.batch_alter_table("participants") as batch:
        batch.drop_column("secagg_msg")
