"""The results store: experiments, one row per trial and metric curves, in SQLite or PostgreSQL.

Callers get plain dataclasses back; ORM models, sessions and migrations stay behind `ResultsStore`.
"""
from __future__ import annotations

import enum
import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Row, create_engine, delete, event, func, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

from peftlab.errors import UserError
from peftlab.store_models import Experiment, Trial, TrialMetric

Mode = Literal["max", "min"]

MIGRATION_TRIES = 20
MIGRATION_LOCK = 0x7065_6674  # "peft": the advisory lock key PostgreSQL migrations take

# One upsert code path, picked by dialect name: both dialects spell ON CONFLICT the same way.
_INSERTS = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}


SMOKE_SUFFIX = "-smoke"
"""Appended to the name of an experiment run with `--smoke` (a check that every piece runs, not
a result): the dashboard leaves such experiments out of comparisons unless asked."""


class ExperimentStatus(str, enum.Enum):
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    INTERRUPTED = "INTERRUPTED"


class TrialStatus(str, enum.Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    EARLY_STOPPED = "EARLY_STOPPED"
    FAILED = "FAILED"


FINISHED = (TrialStatus.COMPLETED, TrialStatus.EARLY_STOPPED, TrialStatus.FAILED)
"""A trial in one of these states has ended and is never run again."""


@dataclass(kw_only=True)
class ExperimentRecord:
    name: str
    spec: dict[str, Any]
    spec_hash: str
    status: ExperimentStatus
    metric: str
    """The search metric, e.g. "validation/accuracy"; a trial's `objective` is its value at the
    trial's kept checkpoint (its best so far while it runs)."""
    mode: Mode
    code_version: str
    package_versions: dict[str, str]
    created_at: datetime
    updated_at: datetime


@dataclass(kw_only=True)
class TrialRecord:
    trial_id: str
    """The Ray trial id, unique within its experiment: writing the same (experiment, trial id)
    again replaces the row."""
    experiment: str
    """The experiment's name."""
    task: str
    dataset: str
    model: str
    method: str
    seed: int
    hparams: dict[str, Any]
    status: TrialStatus
    domain: str | None = None
    error: str | None = None
    trainable_params: int | None = None
    """Parameter counts: None until the method has been applied to the model."""
    total_params: int | None = None
    trainable_pct: float | None = None
    adapter_bytes: int | None = None
    peak_memory_bytes: int | None = None
    train_seconds: float | None = None
    samples_per_second: float | None = None
    steps: int | None = None
    objective: float | None = None
    """The search metric's validation value at the kept checkpoint (training.select); the best so
    far while the trial runs."""
    final_metrics: dict[str, Any] = field(default_factory=dict)
    best_metrics: dict[str, Any] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    node: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    restarts: int = 0
    """How often the trial continued from its last checkpoint after its worker died."""
    test_objective: float | None = None
    """The search metric on the test split at the kept checkpoint, evaluated once at the trial's end."""
    calibration_seconds: float | None = None
    """Time the method spent on the training data before training (selection passes, a first stage)."""


@dataclass(kw_only=True)
class LeaderboardRow:
    task: str
    domain: str | None
    method: str
    trial_id: str
    objective: float
    hparams: dict[str, Any]
    trainable_params: int | None
    trainable_pct: float | None
    peak_memory_bytes: int | None
    train_seconds: float | None
    samples_per_second: float | None
    adapter_bytes: int | None
    status: TrialStatus
    steps: int | None
    """Steps the best trial trained (fewer than max_steps where early stopping ended it)."""
    n_trials: int
    """How many ranked trials (finished, with an objective) the best was chosen among."""
    test_objective: float | None = None
    """The same metric on the test split, for that trial's kept checkpoint; None where it was never
    tested (a store from before test splits)."""
    calibration_seconds: float | None = None
    """Time the method spent on the training data before training (None for a store from before it)."""
    figures: dict[str, float] = field(default_factory=dict)
    """What the trial measured beside its splits: bias scores of the kept checkpoint and of the
    untouched model (bias/..., bias_base/...), calibration and pruning figures."""


_LEADERBOARD_COLUMNS = [f.name for f in fields(LeaderboardRow) if f.name != "figures"] + ["final_metrics"]
SPLIT_METRICS = ("validation/", "test/")


def figures_of(final_metrics: dict[str, Any] | None) -> dict[str, float]:
    """A trial's final metrics other than its splits' (and the kept step)."""
    return {k: v for k, v in (final_metrics or {}).items() if "/" in k and not k.startswith(SPLIT_METRICS)}


BIAS, BIAS_BASE = "bias/", "bias_base/"
"""Prefixes of a trial's bias scores: of its kept checkpoint, and of the model before the method."""
HEADLINE_BIAS = ("crows_pairs", "winobias_gap", "winobias_pro_percent", "bbq_bias_ambiguous",
                 "bbq_bias_disambiguated")
"""Each bias benchmark's overall scores: what summaries show first, before per-type breakdowns and accuracies."""


def test_metric(metric: str) -> str:
    """The test split's name of a validation metric: validation/accuracy -> test/accuracy."""
    return "test/" + metric.split("/", 1)[-1]
_RANKED_STATUSES = [TrialStatus.COMPLETED.value, TrialStatus.EARLY_STOPPED.value]


# Non-finite floats are stored as NULL (JSON null inside JSON columns): PostgreSQL's json type
# rejects NaN/Infinity tokens, and in SQL, NaN sorts above every number, so a diverged trial
# would win a "max" leaderboard. A trial's status and error say why a value is missing.
def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def _json_dumps(value: Any) -> str:
    return json.dumps(_finite(value), allow_nan=False)


def _alembic_config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(files("peftlab.sql") / "migrations"))
    # env.py migrates this connection, so any URL and any engine settings of ours just work.
    config.attributes["connection"] = connection
    return config


def _parse_url(url: str) -> URL:
    try:
        parsed = make_url(url)
    except ArgumentError:
        parsed = None
    if parsed is None or parsed.get_backend_name() not in _INSERTS:
        raise UserError(
            "results store URL must look like sqlite:///PATH or "
            "postgresql+psycopg://USER@HOST:PORT/DB"
        )
    if parsed.drivername == "postgresql":
        # SQLAlchemy's default driver for postgresql:// is psycopg2; peftlab ships psycopg 3.
        return parsed.set(drivername="postgresql+psycopg")
    return parsed


SQLITE_BUSY_MS = 30000
"""How long a SQLite writer waits for another's lock before it fails with "database is locked"."""


def _switch_to_wal(cursor: Any) -> None:
    """Turn on WAL (the dashboard reads while trials write). The switch needs the file to itself,
    and SQLite may refuse it at once, without waiting, while another process creates the same new
    store: it is retried until the busy timeout."""
    import sqlite3

    deadline = time.monotonic() + SQLITE_BUSY_MS / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def read_only_sqlite(path: str | Path) -> Any:
    """A DB-API connection to an existing SQLite file that cannot change it: opened with
    mode=ro (the OS-level guarantee) and query_only, its journal mode left as it is."""
    import sqlite3

    uri = Path(path).expanduser().resolve().as_uri() + "?mode=ro"
    connection = sqlite3.connect(uri, uri=True, check_same_thread=False)
    connection.execute("PRAGMA query_only=ON")
    connection.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")  # wait out a writer's checkpoint
    return connection


class ResultsStore:
    """Experiments, trials and metric curves in one SQL database.

    `migrate` brings the schema to the current revision first; without it, a database that is
    not at the current revision is refused. `read_only` never migrates and refuses writes.
    """

    def __init__(self, url: str, *, migrate: bool = True, read_only: bool = False) -> None:
        parsed = _parse_url(url)
        self.url = parsed.render_as_string(hide_password=True)
        if read_only and parsed.get_backend_name() == "sqlite":
            # Never the writer's set-up (it would switch a file to WAL): the file stays as it is.
            self._engine = create_engine("sqlite://", json_serializer=_json_dumps,
                                         creator=lambda: read_only_sqlite(parsed.database))
        else:
            self._engine = create_engine(
                parsed, json_serializer=_json_dumps, connect_args=self._connect_args(parsed)
            )
            event.listen(self._engine, "connect", self._on_connect(parsed, read_only))
        self._insert = _INSERTS[parsed.get_backend_name()]
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        try:
            self._prepare_schema(upgrade=migrate and not read_only)
        except UserError:
            self._engine.dispose()
            raise

    def _prepare_schema(self, *, upgrade: bool) -> None:
        if upgrade:
            self._upgrade()
            return
        with self._session() as session:
            connection = session.connection()
            config = _alembic_config(connection)
            current = set(MigrationContext.configure(connection).get_current_heads())
            if current != set(ScriptDirectory.from_config(config).get_heads()):
                raise UserError(
                    f"results store {self.url} is not at the current schema; "
                    f"run: peftlab migrate --store {self.url}"
                )

    def _upgrade(self) -> None:
        """Migrate to the current schema. Two processes may start on a new store at once (two
        `run`s, a `run` and a `migrate`): the loser's transaction fails on what the winner created,
        rolls back, and its retry finds the schema current (PostgreSQL also serialises them)."""
        for attempt in range(MIGRATION_TRIES):
            try:
                with self._session() as session:
                    connection = session.connection()
                    if connection.dialect.name == "postgresql":
                        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
                    command.upgrade(_alembic_config(connection), "head")
                return
            except (OperationalError, ProgrammingError, IntegrityError) as exc:
                if attempt == MIGRATION_TRIES - 1:
                    reason = " ".join(str(getattr(exc, "orig", exc)).split())[:200]
                    raise UserError(f"cannot migrate results store {self.url}: {reason}") from None
                time.sleep(0.1 * (attempt + 1))

    @staticmethod
    def _connect_args(url: URL) -> dict[str, Any]:
        if url.get_backend_name() == "sqlite":
            if url.database and url.database != ":memory:" and not url.database.startswith("file:"):
                Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            return {}
        # libpq waits forever for a host that drops packets; a dead store should fail fast.
        return {} if "connect_timeout" in url.query else {"connect_timeout": 10}

    @staticmethod
    def _on_connect(url: URL, read_only: bool) -> Any:
        sqlite_backend = url.get_backend_name() == "sqlite"

        def on_connect(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            if sqlite_backend:
                # WAL lets the dashboard read while trials write; writers queue up to 30 s
                # instead of failing at once with "database is locked".
                cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
                _switch_to_wal(cursor)
                cursor.execute("PRAGMA foreign_keys=ON")
            elif read_only:
                cursor.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
                dbapi_connection.commit()
            cursor.close()

        return on_connect

    @contextmanager
    def _session(self) -> Iterator[Session]:
        """One transaction: commits on success, rolls back on error, names an unreachable store."""
        with self._sessions.begin() as session:
            try:
                session.connection()
            except OperationalError as exc:
                reason = " ".join(str(exc.orig).split())
                raise UserError(f"cannot reach results store {self.url}: {reason}") from None
            yield session

    def close(self) -> None:
        self._engine.dispose()

    # -- experiments ---------------------------------------------------------------------------

    def create_experiment(
        self,
        name: str,
        spec: dict[str, Any],
        spec_hash: str,
        metric: str,
        mode: Mode,
        code_version: str,
        package_versions: dict[str, str],
    ) -> ExperimentRecord:
        """Record a new experiment, or return the existing one if its spec hash is the same."""
        if mode not in ("max", "min"):
            raise UserError(f"search mode must be 'max' or 'min', got {mode!r}")
        with self._session() as session:
            existing = session.scalar(select(Experiment).where(Experiment.name == name))
            if existing is not None:
                if existing.spec_hash != spec_hash:
                    raise UserError(
                        f"experiment {name!r} already exists with a different spec; pick a new "
                        f"name, or continue it with: peftlab resume {name}"
                    )
                return _experiment_record(existing)
            row = Experiment(
                name=name,
                spec=spec,
                spec_hash=spec_hash,
                status=ExperimentStatus.RUNNING.value,
                metric=metric,
                mode=mode,
                code_version=code_version,
                package_versions=package_versions,
            )
            session.add(row)
            session.flush()
            return _experiment_record(row)

    def get_experiment(self, name: str) -> ExperimentRecord | None:
        with self._session() as session:
            row = session.scalar(select(Experiment).where(Experiment.name == name))
            return None if row is None else _experiment_record(row)

    def experiments(self) -> list[ExperimentRecord]:
        with self._session() as session:
            rows = session.scalars(select(Experiment).order_by(Experiment.id))
            return [_experiment_record(row) for row in rows]

    def set_experiment_status(self, name: str, status: ExperimentStatus) -> None:
        with self._session() as session:
            result = session.execute(
                update(Experiment).where(Experiment.name == name).values(status=status.value)
            )
            if result.rowcount == 0:
                raise UserError(f"no experiment named {name!r} in results store {self.url}")

    def interrupt_trials(self, name: str) -> list[str]:
        """Trials of the experiment still RUNNING go back to PENDING (the sweep was interrupted and
        `resume` restarts them); returns their MLflow run ids."""
        with self._session() as session:
            rows = session.scalars(select(Trial).join(Experiment).where(
                Experiment.name == name, Trial.status == TrialStatus.RUNNING.value)).all()
            for row in rows:
                row.status = TrialStatus.PENDING.value
            return [row.mlflow_run_id for row in rows if row.mlflow_run_id]

    def delete_experiment(self, name: str) -> None:
        """Delete an experiment; its trials and their metrics go with it (ON DELETE CASCADE)."""
        with self._session() as session:
            result = session.execute(delete(Experiment).where(Experiment.name == name))
            if result.rowcount == 0:
                raise UserError(f"no experiment named {name!r} in results store {self.url}")

    def _find_experiment(self, session: Session, name: str) -> Row[tuple[int, str]]:
        """The experiment's (id, mode), or a UserError naming the missing experiment."""
        row = session.execute(
            select(Experiment.id, Experiment.mode).where(Experiment.name == name)
        ).one_or_none()
        if row is None:
            raise UserError(f"no experiment named {name!r} in results store {self.url}")
        return row

    # -- trials --------------------------------------------------------------------------------

    def upsert_trial(self, record: TrialRecord) -> None:
        """Insert or fully replace the trial with this (experiment, trial id): safe to call at every update."""
        with self._session() as session:
            values = asdict(record)
            values["experiment_id"] = self._find_experiment(session, values.pop("experiment")).id
            values["status"] = record.status.value
            values["objective"] = _finite(record.objective)
            values["test_objective"] = _finite(record.test_objective)
            stmt = self._insert(Trial).values(values)
            session.execute(
                stmt.on_conflict_do_update(
                    index_elements=[Trial.experiment_id, Trial.trial_id],
                    set_={key: stmt.excluded[key] for key in values if key not in ("experiment_id", "trial_id")},
                )
            )

    def add_metrics(self, experiment: str, trial_id: str, step: int, metrics: dict[str, float]) -> None:
        """Record metric points at one step; writing a (step, name) again replaces its value."""
        if not metrics:
            return
        with self._session() as session:
            experiment_id = self._find_experiment(session, experiment).id
            stmt = self._insert(TrialMetric).values(
                [
                    {"experiment_id": experiment_id, "trial_id": trial_id, "step": step, "name": name,
                     "value": _finite(value)}
                    for name, value in metrics.items()
                ]
            )
            session.execute(
                stmt.on_conflict_do_update(
                    index_elements=[TrialMetric.experiment_id, TrialMetric.trial_id, TrialMetric.step,
                                    TrialMetric.name],
                    set_={"value": stmt.excluded.value},
                )
            )

    def trials(
        self, experiment: str | None = None, *, status: TrialStatus | None = None
    ) -> list[TrialRecord]:
        query = select(Trial, Experiment.name).join(Experiment).order_by(Trial.experiment_id, Trial.trial_id)
        if experiment is not None:
            query = query.where(Experiment.name == experiment)
        if status is not None:
            query = query.where(Trial.status == status.value)
        with self._session() as session:
            return [_trial_record(trial, name) for trial, name in session.execute(query)]

    def get_trial(self, experiment: str, trial_id: str) -> TrialRecord | None:
        query = select(Trial, Experiment.name).join(Experiment).where(
            Experiment.name == experiment, Trial.trial_id == trial_id)
        with self._session() as session:
            row = session.execute(query).one_or_none()
            return None if row is None else _trial_record(*row)

    def metrics(self, experiment: str, trial_id: str) -> list[tuple[int, str, float | None]]:
        """(step, name, value) points of one trial by step then name; None stands for NaN/inf."""
        query = (
            select(TrialMetric.step, TrialMetric.name, TrialMetric.value)
            .join(Experiment, Experiment.id == TrialMetric.experiment_id)
            .where(Experiment.name == experiment, TrialMetric.trial_id == trial_id)
            .order_by(TrialMetric.step, TrialMetric.name)
        )
        with self._session() as session:
            return [tuple(row) for row in session.execute(query)]

    def leaderboard(self, experiment: str) -> list[LeaderboardRow]:
        """The best finished trial per (task, method) by objective, by task then best first."""
        with self._session() as session:
            experiment_id, mode = self._find_experiment(session, experiment)
            pair = (Trial.task, Trial.method)
            best_first = Trial.objective.desc() if mode == "max" else Trial.objective.asc()
            ranked = (
                select(
                    Trial,
                    func.row_number()
                    .over(partition_by=pair, order_by=(best_first, Trial.trial_id))
                    .label("rank"),
                    func.count().over(partition_by=pair).label("n_trials"),
                )
                .where(
                    Trial.experiment_id == experiment_id,
                    Trial.status.in_(_RANKED_STATUSES),
                    Trial.objective.is_not(None),
                )
                .subquery()
            )
            objective = ranked.c.objective.desc() if mode == "max" else ranked.c.objective.asc()
            query = (
                select(*(ranked.c[name] for name in _LEADERBOARD_COLUMNS))
                .where(ranked.c.rank == 1)
                .order_by(ranked.c.task, objective, ranked.c.method)
            )
            rows = session.execute(query).mappings().all()
        return [LeaderboardRow(**{**{k: v for k, v in row.items() if k != "final_metrics"},
                                  "status": TrialStatus(row["status"]), "figures": figures_of(row["final_metrics"])})
                for row in rows]


def _experiment_record(row: Experiment) -> ExperimentRecord:
    return ExperimentRecord(
        name=row.name,
        spec=row.spec,
        spec_hash=row.spec_hash,
        status=ExperimentStatus(row.status),
        metric=row.metric,
        mode=row.mode,  # type: ignore[arg-type]  # create_experiment only writes "max"/"min"
        code_version=row.code_version,
        package_versions=row.package_versions,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _trial_record(row: Trial, experiment: str) -> TrialRecord:
    values = {f.name: getattr(row, f.name) for f in fields(TrialRecord) if f.name != "experiment"}
    values["status"] = TrialStatus(row.status)
    return TrialRecord(experiment=experiment, **values)


def migrate(url: str) -> None:
    """Bring the results store at `url` to the current schema (what `peftlab migrate` runs)."""
    ResultsStore(url, migrate=True).close()
