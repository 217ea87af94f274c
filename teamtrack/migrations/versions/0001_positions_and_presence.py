"""Positions and presence changes, with their exactly-once keys and time indexes.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "positions",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("team", sa.String(64), nullable=False),
        sa.Column("worker", sa.String(64), nullable=False),
        sa.Column("ts", sa.BigInteger, nullable=False, comment="device fix time, epoch ms"),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("lat", sa.Double, nullable=False),
        sa.Column("lon", sa.Double, nullable=False),
        sa.Column("acc", sa.Double),
        sa.Column("speed", sa.Double),
        sa.Column("heading", sa.Double),
        sa.Column("battery", sa.Double),
        sa.Column("origin", sa.String(64), nullable=False, comment="broker the device used"),
        sa.Column("received_ms", sa.BigInteger, nullable=False, comment="bridge receive time"),
        sa.UniqueConstraint("team", "worker", "ts", "seq", name="uq_positions_worker_fix"),
    )
    op.create_index("ix_positions_team_time", "positions", ["team", "ts", "id"])
    op.create_table(
        "presence_changes",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("team", sa.String(64), nullable=False),
        sa.Column("worker", sa.String(64), nullable=False),
        sa.Column("ts", sa.BigInteger, nullable=False, comment="bridge receive time, epoch ms"),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("origin", sa.String(64), nullable=False),
        sa.UniqueConstraint("team", "worker", "ts", "status", name="uq_presence_worker_change"),
    )
    op.create_index("ix_presence_team_time", "presence_changes", ["team", "ts", "id"])


def downgrade() -> None:
    op.drop_index("ix_presence_team_time", table_name="presence_changes")
    op.drop_table("presence_changes")
    op.drop_index("ix_positions_team_time", table_name="positions")
    op.drop_table("positions")
