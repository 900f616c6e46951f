"""Initial results store: experiments, trials and their metric curves.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "experiments",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String, nullable=False, unique=True),
        sa.Column("spec", sa.JSON, nullable=False),
        sa.Column("spec_hash", sa.String, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String, nullable=False),
        sa.Column("metric", sa.String, nullable=False),
        sa.Column("mode", sa.String, nullable=False),
        sa.Column("code_version", sa.String, nullable=False),
        sa.Column("package_versions", sa.JSON, nullable=False),
    )
    op.create_table(
        "trials",
        sa.Column("trial_id", sa.String, primary_key=True),
        sa.Column(
            "experiment_id",
            sa.Integer,
            sa.ForeignKey("experiments.id", ondelete="CASCADE"),
            nullable=False,
        ),
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
    )
    op.create_index(
        "ix_trials_experiment_task_method", "trials", ["experiment_id", "task", "method"]
    )
    op.create_index("ix_trials_status", "trials", ["status"])
    op.create_table(
        "trial_metrics",
        sa.Column(
            "trial_id",
            sa.String,
            sa.ForeignKey("trials.trial_id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("step", sa.Integer, primary_key=True),
        sa.Column("name", sa.String, primary_key=True),
        sa.Column("value", sa.Float, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("trial_metrics")
    op.drop_index("ix_trials_status", table_name="trials")
    op.drop_index("ix_trials_experiment_task_method", table_name="trials")
    op.drop_table("trials")
    op.drop_table("experiments")
