"""Zones, alerts, and the rules service's state (what it has applied, per team and worker).

Revision ID: 0004_zones_alerts
Revises: 0003_erasures
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_zones_alerts"
down_revision = "0003_erasures"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "zones",
        sa.Column("team", sa.String(64), primary_key=True),
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("feature", sa.Text, nullable=False, comment="GeoJSON Feature"),
        sa.Column("updated_ms", sa.BigInteger, nullable=False),
        sa.Column("updated_by", sa.String(64), nullable=False),
    )
    op.create_table(
        "zone_versions",
        sa.Column("team", sa.String(64), primary_key=True),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("changed_ms", sa.BigInteger, nullable=False),
        sa.Column("changed_by", sa.String(64), nullable=False),
        sa.Column("published", sa.BigInteger, nullable=False, comment="version announced"),
    )
    op.create_table(
        "alerts",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("team", sa.String(64), nullable=False),
        sa.Column("worker", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("zone", sa.String(64)),
        sa.Column("zone_name", sa.String(200)),
        sa.Column("at_ms", sa.BigInteger, nullable=False, comment="triggering fix or status"),
        sa.Column("raised_ms", sa.BigInteger, nullable=False),
        sa.Column("detail", sa.String(300), nullable=False),
        sa.Column("acked_by", sa.String(64)),
        sa.Column("acked_ms", sa.BigInteger),
        sa.Column("published", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("ack_published", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("hook_state", sa.SmallInteger, nullable=False, server_default="0",
                  comment="webhook: 0 pending, 1 delivered, 2 given up"),
        sa.Index("ix_alerts_team_raised", "team", "raised_ms"),
        sa.Index("ix_alerts_team_worker", "team", "worker"),
    )
    op.create_table(
        "rule_state",
        sa.Column("team", sa.String(64), primary_key=True),
        sa.Column("worker", sa.String(64), primary_key=True),
        sa.Column("state", sa.Text, nullable=False, comment="JSON"),
    )
    op.create_table(
        "rule_cursors",
        sa.Column("team", sa.String(64), primary_key=True),
        sa.Column("cursor", sa.String(200), nullable=False, comment="last batch applied"),
    )


def downgrade() -> None:
    for table in ("rule_cursors", "rule_state", "alerts", "zone_versions", "zones"):
        op.drop_table(table)
