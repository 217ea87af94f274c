"""Worker events (an OwnTracks phone's region transitions), with their exactly-once key.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "worker_events",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("team", sa.String(64), nullable=False),
        sa.Column("worker", sa.String(64), nullable=False),
        sa.Column("ts", sa.BigInteger, nullable=False, comment="when it happened, epoch ms"),
        sa.Column("type", sa.String(16), nullable=False, comment="transition"),
        sa.Column("event", sa.String(16), nullable=False, comment="enter / leave"),
        sa.Column("region", sa.String(200), nullable=False, comment="region id, else its name"),
        sa.Column("body", sa.Text, nullable=False, comment="the event as the contract's JSON"),
        sa.Column("origin", sa.String(64), nullable=False),
        sa.Column("received_ms", sa.BigInteger, nullable=False),
        sa.UniqueConstraint("team", "worker", "ts", "type", "event", "region",
                            name="uq_worker_events_event"),
    )
    op.create_index("ix_worker_events_team_time", "worker_events", ["team", "ts", "id"])


def downgrade() -> None:
    op.drop_index("ix_worker_events_team_time", table_name="worker_events")
    op.drop_table("worker_events")
