"""Views the dashboard reads: dashboard_experiments, dashboard_trials, dashboard_curves.

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-02
"""
from __future__ import annotations

from alembic import op

from peftlab.sql import view_statements

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

# The SQL lives beside the other storage contracts, in sql/views/, one file per revision.
VIEWS_SQL = "0002_dashboard.sql"


def upgrade() -> None:
    for statement in view_statements(VIEWS_SQL):
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS dashboard_curves")
    op.execute("DROP VIEW IF EXISTS dashboard_trials")
    op.execute("DROP VIEW IF EXISTS dashboard_experiments")
