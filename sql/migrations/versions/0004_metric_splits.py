"""Metrics per split: what stores before it call `eval/<name>` was the search's evaluation split,
so it becomes `validation/<name>`; those trials have no test metrics (shown as missing, not zero).

Renames curve points, each experiment's search metric and the keys of the trials' final and best
metrics, and adds `trials.test_objective` (the search metric on the test split at the kept
checkpoint) to the table and to the dashboard_trials view. The downgrade renames them back and
drops the test points and column, which 0003 cannot hold.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""
from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

from peftlab.sql import view_statements

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def _rename(old: str, new: str) -> None:
    bind = op.get_bind()
    length = len(old) + 1
    bind.execute(sa.text(f"UPDATE trial_metrics SET name = :new || SUBSTR(name, {length}) "
                         "WHERE name LIKE :pattern"), {"new": new, "pattern": f"{old}%"})
    bind.execute(sa.text(f"UPDATE experiments SET metric = :new || SUBSTR(metric, {length}) "
                         "WHERE metric LIKE :pattern"), {"new": new, "pattern": f"{old}%"})
    rows = bind.execute(sa.text("SELECT experiment_id, trial_id, final_metrics, best_metrics FROM trials")).all()
    for experiment_id, trial_id, final, best in rows:
        renamed = []
        for value in (final, best):
            value = json.loads(value) if isinstance(value, str) else (value or {})
            renamed.append({new + k[len(old):] if k.startswith(old) else k: v for k, v in value.items()
                            if not (new == "eval/" and k.startswith("test/"))})
        update = sa.text("UPDATE trials SET final_metrics = :final, best_metrics = :best "
                         "WHERE experiment_id = :experiment AND trial_id = :trial").bindparams(
            sa.bindparam("final", type_=sa.JSON), sa.bindparam("best", type_=sa.JSON))
        bind.execute(update, {"final": renamed[0], "best": renamed[1], "experiment": experiment_id, "trial": trial_id})


def upgrade() -> None:
    _rename("eval/", "validation/")
    op.execute("DROP VIEW dashboard_trials")
    with op.batch_alter_table("trials") as batch:
        batch.add_column(sa.Column("test_objective", sa.Float, nullable=True))
    for statement in view_statements("0004_dashboard_trials.sql"):
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP VIEW dashboard_trials")
    with op.batch_alter_table("trials") as batch:
        batch.drop_column("test_objective")
    old = [s for s in view_statements("0002_dashboard.sql") if s.startswith("CREATE VIEW dashboard_trials")]
    for statement in old:
        op.execute(statement)
    op.execute("DELETE FROM trial_metrics WHERE name LIKE 'test/%'")
    _rename("validation/", "eval/")
