"""`trials.calibration_seconds`: the time a method spent on the training data before training
(gradient passes that select what it trains, a first training stage), kept apart from train time.

Adds the column to the table and to the dashboard_trials view; the downgrade drops both.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from peftlab.sql import view_statements

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.execute("DROP VIEW dashboard_trials")
    with op.batch_alter_table("trials") as batch:
        batch.add_column(sa.Column("calibration_seconds", sa.Float, nullable=True))
    for statement in view_statements("0005_dashboard_trials.sql"):
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP VIEW dashboard_trials")
    with op.batch_alter_table("trials") as batch:
        batch.drop_column("calibration_seconds")
    for statement in view_statements("0004_dashboard_trials.sql"):
        op.execute(statement)
