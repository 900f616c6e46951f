"""Views the dashboard reads: dashboard_experiments, dashboard_trials, dashboard_curves.

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-02
"""
from __future__ import annotations

import re
from pathlib import Path

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

# The SQL lives beside the other storage contracts, in sql/views/, one file per revision.
VIEWS_SQL = Path(__file__).resolve().parents[2] / "views" / "0002_dashboard.sql"


def statements(text: str) -> list[str]:
    """The file's statements: comment lines dropped, split on the ';' that ends each one."""
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("--"))
    return [part.strip() for part in re.split(r";\s*(?:\n|$)", body) if part.strip()]


def upgrade() -> None:
    for statement in statements(VIEWS_SQL.read_text()):
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS dashboard_curves")
    op.execute("DROP VIEW IF EXISTS dashboard_trials")
    op.execute("DROP VIEW IF EXISTS dashboard_experiments")
