"""one-time enrolment codes, device revocation, enrolment rate-limit counters

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 10:00:00

Devices enrolled before this revision all used the fleet secret: ``devices.enrollment``
defaults to ``fleet`` for them (and counts against the fleet secret's device cap).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "enrollment_codes",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("code_hash", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=8), nullable=False),
        sa.Column("device_class", sa.String(length=32), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("code_hash"),
    )
    op.create_table(
        "enrollment_counters",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("minute", sa.BigInteger(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    # Plain ADD COLUMNs: no rebuild of the devices table on SQLite (other tables' foreign keys
    # point at it, and a rebuild would copy every device). SQLite takes the foreign key inline
    # (allowed for a column added with a NULL default); Alembic can only add it separately.
    op.add_column(
        "devices",
        sa.Column("enrollment", sa.String(length=8), server_default="fleet", nullable=False),
    )
    if op.get_bind().dialect.name == "sqlite":
        op.execute(
            "ALTER TABLE devices ADD COLUMN enrollment_code_id INTEGER"
            " CONSTRAINT fk_devices_enrollment_code_id REFERENCES enrollment_codes (id)"
        )
    else:
        op.add_column("devices", sa.Column("enrollment_code_id", sa.Integer(), nullable=True))
        op.create_foreign_key(
            "fk_devices_enrollment_code_id", "devices", "enrollment_codes", ["enrollment_code_id"], ["id"]
        )
    op.add_column(
        "devices", sa.Column("class_fixed", sa.Boolean(), server_default=sa.false(), nullable=False)
    )
    op.add_column("devices", sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("revoked_at")
        batch.drop_column("class_fixed")
        batch.drop_column("enrollment_code_id")
        batch.drop_column("enrollment")
    op.drop_table("enrollment_counters")
    op.drop_table("enrollment_codes")
