"""The erasure log: who erased which worker's history, when, and how many rows (no positions).

Revision ID: 0003_erasures
Revises: 0002
Create Date: 2026-12-18
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_erasures"
down_revision = "0002"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "erasures",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("at_ms", sa.BigInteger, nullable=False, comment="when, epoch ms"),
        sa.Column("operator", sa.String(200), nullable=False, comment="who ran it"),
        sa.Column("team", sa.String(64), nullable=False),
        sa.Column("worker", sa.String(64), nullable=False),
        sa.Column("before_ms", sa.BigInteger, comment="only data before this; NULL: all"),
        sa.Column("positions", sa.BigInteger, nullable=False),
        sa.Column("presence", sa.BigInteger, nullable=False),
        sa.Column("events", sa.BigInteger, nullable=False),
        sa.Column("last_known", sa.BigInteger, comment="entries removed; NULL: not reached"),
    )


def downgrade() -> None:
    op.drop_table("erasures")
