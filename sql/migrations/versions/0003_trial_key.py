"""Trials keyed by (experiment, trial id), not by the trial id alone; curves carry the experiment;
`restarts` counts how often a trial continued from its checkpoint after its worker died.

Ray's trial ids are 8 hex digits, unique within one experiment only: as a global key, a reused id
moved a row across experiments. Existing rows keep their ids under their own experiment.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from peftlab.sql import view_statements

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None

TRIAL_COLUMNS = (
    "trial_id, experiment_id, task, domain, dataset, model, method, seed, hparams, status, error, "
    "trainable_params, total_params, trainable_pct, adapter_bytes, peak_memory_bytes, train_seconds, "
    "samples_per_second, steps, objective, final_metrics, best_metrics, mlflow_run_id, node, "
    "started_at, finished_at"
)


def _drop_views() -> None:
    for view in ("dashboard_curves", "dashboard_trials", "dashboard_experiments"):
        op.execute(f"DROP VIEW IF EXISTS {view}")


def _trials_table(name: str, key: tuple[str, ...], *, restarts: bool) -> None:
    columns = [
        sa.Column("trial_id", sa.String, nullable=False),
        sa.Column("experiment_id", sa.Integer, sa.ForeignKey("experiments.id", ondelete="CASCADE"), nullable=False),
        sa.Column("task", sa.String, nullable=False),
        sa.Column("domain", sa.String, nullable=True),
        sa.Column("dataset", sa.String, nullable=False),
        sa.Column("model", sa.String, nullable=False),
        sa.Column("method", sa.String, nullable=False),
        sa.Column("seed", sa.Integer, nullable=False),
        sa.Column("hparams", sa.JSON, nullable=False),
        sa.Column("status", sa.String, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("trainable_params", sa.BigInteger, nullable=True),
        sa.Column("total_params", sa.BigInteger, nullable=True),
        sa.Column("trainable_pct", sa.Float, nullable=True),
        sa.Column("adapter_bytes", sa.BigInteger, nullable=True),
        sa.Column("peak_memory_bytes", sa.BigInteger, nullable=True),
        sa.Column("train_seconds", sa.Float, nullable=True),
        sa.Column("samples_per_second", sa.Float, nullable=True),
        sa.Column("steps", sa.Integer, nullable=True),
        sa.Column("objective", sa.Float, nullable=True),
        sa.Column("final_metrics", sa.JSON, nullable=False),
        sa.Column("best_metrics", sa.JSON, nullable=False),
        sa.Column("mlflow_run_id", sa.String, nullable=True),
        sa.Column("node", sa.String, nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    ]
    if restarts:
        columns.append(sa.Column("restarts", sa.Integer, nullable=False, server_default="0"))
    op.create_table(name, *columns, sa.PrimaryKeyConstraint(*key, name=f"pk_{name}"))


def _metrics_table(name: str, trials: str, *, keyed_by_experiment: bool) -> None:
    owner = ("experiment_id", "trial_id") if keyed_by_experiment else ("trial_id",)
    columns = [sa.Column("trial_id", sa.String, nullable=False)]
    if keyed_by_experiment:
        columns.insert(0, sa.Column("experiment_id", sa.Integer, nullable=False))
    op.create_table(
        name, *columns,
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("name", sa.String, nullable=False),
        sa.Column("value", sa.Float, nullable=True),
        sa.PrimaryKeyConstraint(*owner, "step", "name", name=f"pk_{name}"),
        sa.ForeignKeyConstraint(list(owner), [f"{trials}.{column}" for column in owner], ondelete="CASCADE",
                                name="fk_trial_metrics_trial"),
    )


def _rebuild(revision_tag: str, *, by_experiment: bool, metrics_select: str) -> None:
    """Build the trials and trial_metrics of one revision beside the current ones, copy the rows
    over (metrics_select yields the new metrics table's rows), swap them in, and remake the
    indexes and revision 0002's views."""
    trials, metrics = f"trials_{revision_tag}", f"trial_metrics_{revision_tag}"
    _drop_views()
    _trials_table(trials, ("experiment_id", "trial_id") if by_experiment else ("trial_id",), restarts=by_experiment)
    op.execute(f"INSERT INTO {trials} ({TRIAL_COLUMNS}) SELECT {TRIAL_COLUMNS} FROM trials")
    _metrics_table(metrics, trials, keyed_by_experiment=by_experiment)
    columns = "experiment_id, trial_id, step, name, value" if by_experiment else "trial_id, step, name, value"
    op.execute(f"INSERT INTO {metrics} ({columns}) {metrics_select}")
    op.drop_table("trial_metrics")
    op.drop_table("trials")
    op.rename_table(trials, "trials")
    op.rename_table(metrics, "trial_metrics")
    op.create_index("ix_trials_experiment_task_method", "trials", ["experiment_id", "task", "method"])
    op.create_index("ix_trials_status", "trials", ["status"])
    for statement in view_statements("0002_dashboard.sql"):
        op.execute(statement)


def upgrade() -> None:
    _rebuild("v3", by_experiment=True,
             metrics_select="SELECT t.experiment_id, m.trial_id, m.step, m.name, m.value "
                            "FROM trial_metrics m JOIN trials t ON t.trial_id = m.trial_id")
    op.execute("DROP VIEW dashboard_curves")
    for statement in view_statements("0003_dashboard_curves.sql"):
        op.execute(statement)


def downgrade() -> None:
    """Back to one key per trial id; refused while two experiments share a trial id."""
    shared = op.get_bind().execute(sa.text(
        "SELECT trial_id FROM trials GROUP BY trial_id HAVING COUNT(*) > 1 LIMIT 1")).first()
    if shared is not None:
        raise RuntimeError(f"trial id {shared[0]} is in more than one experiment; revision 0002 cannot hold both")
    _rebuild("v2", by_experiment=False, metrics_select="SELECT trial_id, step, name, value FROM trial_metrics")
