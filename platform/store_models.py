"""ORM models of the results store: how `experiments`, `trials` and `trial_metrics` map to Python.

sql/migrations creates the tables without importing this module; a snapshot test keeps them equal.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that goes in and comes out timezone-aware in UTC on every backend.

    SQLite keeps no offset, so values are normalised to UTC on write and tagged UTC on read.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            # A naive time has no meaning across the nodes of a cluster; refuse it here.
            raise ValueError(f"naive datetime {value!r}; use datetime.now(timezone.utc)")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Experiment(Base):
    __tablename__ = "experiments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String, unique=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    spec_hash: Mapped[str] = mapped_column(String)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    status: Mapped[str] = mapped_column(String)
    metric: Mapped[str] = mapped_column(String)
    mode: Mapped[str] = mapped_column(String)
    code_version: Mapped[str] = mapped_column(String)
    package_versions: Mapped[dict[str, str]] = mapped_column(JSON)


class Trial(Base):
    __tablename__ = "trials"
    __table_args__ = (
        Index("ix_trials_experiment_task_method", "experiment_id", "task", "method"),
        Index("ix_trials_status", "status"),
    )

    # Ray's trial ids are unique within one experiment only.
    experiment_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("experiments.id", ondelete="CASCADE"), primary_key=True
    )
    trial_id: Mapped[str] = mapped_column(String, primary_key=True)
    task: Mapped[str] = mapped_column(String)
    domain: Mapped[str | None] = mapped_column(String)
    dataset: Mapped[str] = mapped_column(String)
    model: Mapped[str] = mapped_column(String)
    method: Mapped[str] = mapped_column(String)
    seed: Mapped[int] = mapped_column(Integer)
    hparams: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String)
    error: Mapped[str | None] = mapped_column(Text)
    # Parameter counts are known once the method is applied, after the trial's first write.
    trainable_params: Mapped[int | None] = mapped_column(BigInteger)
    total_params: Mapped[int | None] = mapped_column(BigInteger)
    trainable_pct: Mapped[float | None] = mapped_column(Float)
    adapter_bytes: Mapped[int | None] = mapped_column(BigInteger)
    peak_memory_bytes: Mapped[int | None] = mapped_column(BigInteger)
    train_seconds: Mapped[float | None] = mapped_column(Float)
    samples_per_second: Mapped[float | None] = mapped_column(Float)
    steps: Mapped[int | None] = mapped_column(Integer)
    objective: Mapped[float | None] = mapped_column(Float)
    final_metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    best_metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    mlflow_run_id: Mapped[str | None] = mapped_column(String)
    node: Mapped[str | None] = mapped_column(String)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    restarts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """How often the trial continued from its last checkpoint after its worker died."""
    test_objective: Mapped[float | None] = mapped_column(Float)
    """The search metric on the test split at the kept checkpoint; None until the trial is tested."""
    calibration_seconds: Mapped[float | None] = mapped_column(Float)
    """Time the method spent on the training data before training (0 for methods that need none)."""


class TrialMetric(Base):
    __tablename__ = "trial_metrics"
    __table_args__ = (
        ForeignKeyConstraint(["experiment_id", "trial_id"], ["trials.experiment_id", "trials.trial_id"],
                             ondelete="CASCADE", name="fk_trial_metrics_trial"),
    )

    experiment_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    trial_id: Mapped[str] = mapped_column(String, primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String, primary_key=True)
    # Nullable: a diverged run's NaN/inf loss is kept as a point with no value (see store._finite).
    value: Mapped[float | None] = mapped_column(Float)
