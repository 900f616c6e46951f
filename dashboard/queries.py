"""Every read the dashboard makes: bound-parameter queries over the views in sql/views/.

Plain functions of a read-only connection returning DataFrames; loaders.py caches them. The
aggregation (counts, per-configuration means over seeds, best configuration per method, gaps
to the best) happens here in SQL, so only reduced rows reach Python. No Streamlit here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import (
    BigInteger,
    Connection,
    Engine,
    Float,
    Integer,
    Select,
    String,
    and_,
    case,
    column,
    create_engine,
    distinct,
    func,
    or_,
    select,
    table,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import QueuePool

from peftlab.dashboard import stats
from peftlab.errors import UserError
from peftlab.store import BIAS, BIAS_BASE, SMOKE_SUFFIX, ResultsStore, TrialStatus, read_only_sqlite
from peftlab.store_models import UTCDateTime

STATUSES = [status.value for status in TrialStatus]

experiments_view = table(
    "dashboard_experiments",
    column("experiment", String), column("status", String), column("metric", String),
    column("mode", String), column("code_version", String),
    column("created_at", UTCDateTime), column("updated_at", UTCDateTime),
)
trials_view = table(
    "dashboard_trials",
    column("trial_id", String), column("experiment", String), column("metric", String),
    column("mode", String), column("task", String), column("domain", String),
    column("dataset", String), column("model", String), column("method", String),
    column("seed", Integer), column("status", String), column("hparams", String),
    column("config", String), column("objective", Float), column("score", Float),
    column("test_objective", Float), column("test_score", Float), column("ranked", Integer),
    column("trainable_params", BigInteger),
    column("total_params", BigInteger), column("trainable_pct", Float),
    column("adapter_bytes", BigInteger), column("peak_memory_bytes", BigInteger),
    column("train_seconds", Float), column("samples_per_second", Float),
    column("steps", Integer), column("error", String), column("mlflow_run_id", String),
    column("node", String), column("started_at", UTCDateTime), column("finished_at", UTCDateTime),
)
curves_view = table(
    "dashboard_curves",
    column("experiment", String), column("trial_id", String), column("step", Integer), column("name", String),
    column("value", Float),
)

BOARD = tuple(stats.BOARD)
"""Methods are compared per task of an experiment (one model, one metric, one data split)."""
COSTS = ("trainable_params", "total_params", "trainable_pct", "adapter_bytes",
         "peak_memory_bytes", "train_seconds", "samples_per_second")


@dataclass(frozen=True)
class Filters:
    """The sidebar's selections; an empty tuple means no restriction on that column."""

    experiment: tuple[str, ...] = ()
    domain: tuple[str, ...] = ()
    task: tuple[str, ...] = ()
    model: tuple[str, ...] = ()
    method: tuple[str, ...] = ()
    status: tuple[str, ...] = ()
    smoke: bool = False
    """Include `--smoke` experiments (named *-smoke) where no experiment is chosen: a smoke run is a
    check that every piece runs, and its numbers would skew comparisons across experiments."""

    def _columns(self) -> list[str]:
        return [f.name for f in fields(self) if f.name != "smoke"]

    def where(self, view=trials_view) -> list[Any]:
        chosen = [view.c[name].in_(getattr(self, name)) for name in self._columns() if getattr(self, name)]
        return chosen + self.smoke_where(view.c.experiment)

    def smoke_where(self, experiment) -> list[Any]:
        """The condition that leaves smoke experiments out, where it applies."""
        return [] if self.smoke or self.experiment else [experiment.not_like(f"%{SMOKE_SUFFIX}")]

    @property
    def narrows_trials(self) -> bool:
        """True when a filter other than the experiment one is set."""
        return any(getattr(self, name) for name in self._columns() if name != "experiment")


# -- connection --------------------------------------------------------------------------------

def check_store(url: str) -> str:
    """Refuse, as one UserError, a store that is missing or not at the current schema; return
    the URL as it may be shown (password hidden)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        parsed = None  # ResultsStore names the expected URL forms
    sqlite = parsed is not None and parsed.get_backend_name() == "sqlite"
    if sqlite and (not parsed.database or not Path(parsed.database).expanduser().is_file()):
        raise UserError(f"no results store at {url}: run a sweep first (peftlab run SPEC)")
    # read_only: checks the schema revision (with the fix command), never migrates.
    store = ResultsStore(url, migrate=False, read_only=True)
    store.close()
    return store.url


def open_engine(url: str) -> Engine:
    """A read-only engine on a checked store: SQLite opened with mode=ro, PostgreSQL sessions
    in read-only transactions. Connects lazily, on the first query."""
    check_store(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        # mode=ro: the OS-level guarantee that the dashboard can never write the file.
        return create_engine("sqlite://", poolclass=QueuePool, creator=lambda: read_only_sqlite(parsed.database))
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")  # what peftlab ships
    connect_args: dict[str, Any] = {"options": "-c default_transaction_read_only=on"}
    if "connect_timeout" not in parsed.query:
        connect_args["connect_timeout"] = 10
    return create_engine(parsed, connect_args=connect_args)


def parse_hparams(text: str | None) -> dict[str, Any]:
    """A trial's hyperparameters from the JSON text that dashboard_trials returns."""
    return json.loads(text) if text else {}


def _frame(connection: Connection, query: Select) -> pd.DataFrame:
    result = connection.execute(query)
    # Plain tuples: given SQLAlchemy rows, pandas probes each for namedtuple fields (~10 us a row).
    frame = pd.DataFrame([tuple(row) for row in result.fetchall()], columns=list(result.keys()))
    # A numeric column with NULLs arrives as objects; make it numbers (NaN) for pandas and Plotly.
    for selected in query.selected_columns:
        if isinstance(selected.type, Integer | Float) and frame[selected.name].dtype == object:
            frame[selected.name] = pd.to_numeric(frame[selected.name])
    return frame


# -- sidebar -----------------------------------------------------------------------------------

def filter_options(connection: Connection) -> dict[str, list[str]]:
    """Distinct values of each filter column, and the experiments (with or without trials)."""
    t = trials_view
    names = ("domain", "task", "model", "method", "status")
    combos = _frame(connection, select(*(t.c[n] for n in names)).group_by(*(t.c[n] for n in names)))
    options = {n: sorted(combos[n].dropna().unique().tolist()) for n in names}
    experiments = connection.execute(
        select(experiments_view.c.experiment).order_by(experiments_view.c.created_at.desc())
    ).scalars()
    options["experiment"] = list(experiments)
    return options


# -- Overview ----------------------------------------------------------------------------------

def overview(connection: Connection, filters: Filters) -> pd.DataFrame:
    """One row per experiment: status, trial counts by status, time span, models, domains."""
    t, e = trials_view, experiments_view
    where = filters.where(t)
    counts = (
        select(
            t.c.experiment,
            func.count().label("trials"),
            *(func.sum(case((t.c.status == s, 1), else_=0)).label(s.lower()) for s in STATUSES),
            func.min(t.c.started_at).label("first_started"),
            func.max(t.c.finished_at).label("last_finished"),
            func.count(distinct(t.c.task)).label("tasks"),
            func.count(distinct(t.c.method)).label("methods"),
        )
        .where(*where)
        .group_by(t.c.experiment)
        .subquery("counts")
    )
    lists = {}
    for name in ("model", "domain"):
        pairs = select(t.c.experiment, t.c[name]).where(*where).distinct().subquery(f"{name}_pairs")
        lists[name] = (
            select(pairs.c.experiment, func.aggregate_strings(pairs.c[name], ", ").label(f"{name}s"))
            .group_by(pairs.c.experiment)
            .subquery(f"{name}_lists")
        )
    zero = [func.coalesce(counts.c[c], 0).label(c) for c in ("trials", *(s.lower() for s in STATUSES))]
    query = (
        select(
            e.c.experiment, e.c.status, e.c.metric, e.c.mode, e.c.created_at, *zero,
            counts.c.first_started, counts.c.last_finished,
            func.coalesce(counts.c.tasks, 0).label("tasks"),
            func.coalesce(counts.c.methods, 0).label("methods"),
            lists["model"].c.models, lists["domain"].c.domains,
        )
        .select_from(
            e.outerjoin(counts, counts.c.experiment == e.c.experiment)
            .outerjoin(lists["model"], lists["model"].c.experiment == e.c.experiment)
            .outerjoin(lists["domain"], lists["domain"].c.experiment == e.c.experiment)
        )
        .order_by(e.c.created_at.desc(), e.c.experiment)
    )
    if filters.experiment:
        query = query.where(e.c.experiment.in_(filters.experiment))
    query = query.where(*filters.smoke_where(e.c.experiment))
    if filters.narrows_trials:  # experiments without a matching trial drop out
        query = query.where(counts.c.trials.is_not(None))
    return _frame(connection, query)


def failures(connection: Connection, filters: Filters) -> pd.DataFrame:
    """Failed trials grouped by experiment, task, method and error text, most frequent first."""
    t = trials_view
    n = func.count().label("trials")
    query = (
        select(t.c.experiment, t.c.task, t.c.method, t.c.error, n)
        .where(*filters.where(t), t.c.status == TrialStatus.FAILED.value)
        .group_by(t.c.experiment, t.c.task, t.c.method, t.c.error)
        .order_by(n.desc(), t.c.experiment, t.c.task, t.c.method)
    )
    return _frame(connection, query)


# -- Leaderboard, Methods x domains ------------------------------------------------------------

def leaderboard_seeds(connection: Connection, filters: Filters) -> pd.DataFrame:
    """The seed trials of each method's best configuration, per task of each experiment.

    A configuration is a method with its hyperparameters; its seeds are averaged. The configuration
    run with the most seeds wins (the one re-run by `seeds`: comparing its average with a single
    lucky seed of another would favour luck), then the best average (on the signed score), ties
    going to the lower config text. A configuration with a completed run counts only its
    completed runs. Only finished
    trials with an objective count (completed or early-stopped, as in `peftlab results`).
    """
    t = trials_view
    key = [*BOARD, "method"]
    # A configuration that ran to the end drops its early-stopped runs: a seed re-run of a
    # configuration ASHA had stopped must not average a half-trained run with finished ones.
    # Counted within the group rather than by joining the completed configurations back: SQLite
    # scans such a join once per trial (minutes at 100,000 trials).
    completed = t.c.status == TrialStatus.COMPLETED.value
    n_completed = func.sum(case((completed, 1), else_=0))
    # One row per configuration, then one window over those (not over every trial): on
    # SQLite this is ~4x faster than windows over the trials for 100,000 rows.
    configs = (
        select(*(t.c[c] for c in key), t.c.config,
               case((n_completed > 0, func.avg(case((completed, t.c.score)))),
                    else_=func.avg(t.c.score)).label("config_score"),
               case((n_completed > 0, n_completed), else_=func.count()).label("n_seeds"),
               n_completed.label("n_completed"))
        .where(*filters.where(t), t.c.ranked == 1)
        .group_by(*(t.c[c] for c in key), t.c.config)
        .subquery("configs")
    )
    per_method = [configs.c[c] for c in key]
    ranked = select(
        configs,
        func.row_number()
        .over(partition_by=per_method,
              order_by=[configs.c.n_seeds.desc(), configs.c.config_score.desc(), configs.c.config])
        .label("config_rank"),
        func.count().over(partition_by=per_method).label("n_configs"),
        func.sum(configs.c.n_seeds).over(partition_by=per_method).label("n_trials"),
    ).subquery("ranked")
    best = select(ranked).where(ranked.c.config_rank == 1).subquery("best")
    query = (
        select(
            *(t.c[c] for c in (*BOARD, "domain", "metric", "mode", "method", "config", "hparams",
                               "trial_id", "seed", "status", "objective", "score", "test_objective",
                               "test_score", *COSTS)),
            best.c.n_configs, best.c.n_trials,
        )
        .select_from(t)
        .join(best, and_(*(t.c[c] == best.c[c] for c in (*key, "config"))))
        # The winner's runs, by the same rule, without joining `finished` again (on SQLite that
        # join has no index and scans it once per row).
        .where(*filters.where(t), t.c.ranked == 1,
               or_(t.c.status == TrialStatus.COMPLETED.value, best.c.n_completed == 0))
        .order_by(*(t.c[c] for c in (*key, "seed", "trial_id")))
    )
    return _frame(connection, query)


# -- Pareto, Sensitivity -----------------------------------------------------------------------

def boards(connection: Connection, filters: Filters) -> pd.DataFrame:
    """Tasks of experiments that have finished trials, with their metric and trial count."""
    t = trials_view
    columns = [t.c[c] for c in (*BOARD, "domain", "metric", "mode")]
    query = (
        select(*columns, func.count().label("trials"))
        .where(*filters.where(t), t.c.ranked == 1)
        .group_by(*columns)
        .order_by(*columns)
    )
    return _frame(connection, query)


def _board_where(board: tuple[str, str, str] | None) -> list[Any]:
    if board is None:
        return []
    return [trials_view.c[name] == value for name, value in zip(BOARD, board, strict=True)]


def pareto_points(connection: Connection, filters: Filters,
                  board: tuple[str, str, str] | None) -> pd.DataFrame:
    """Finished trials with their costs, objective, and `gap`: score minus the best score of
    their task (0 for the best trial, negative below it), which makes tasks comparable."""
    t = trials_view
    best = func.max(t.c.score).over(partition_by=[t.c[c] for c in BOARD])
    query = (
        select(
            *(t.c[c] for c in (*BOARD, "domain", "metric", "mode", "method", "trial_id", "seed",
                               "status", "hparams", "objective", "score", "trainable_params",
                               "trainable_pct", "peak_memory_bytes", "train_seconds")),
            (t.c.score - best).label("gap"),
        )
        .where(*filters.where(t), t.c.ranked == 1, *_board_where(board))
        .order_by(t.c.trial_id)
    )
    return _frame(connection, query)


def sensitivity_trials(connection: Connection, filters: Filters,
                       board: tuple[str, str, str] | None, method: str) -> pd.DataFrame:
    """One method's finished trials on one task: hyperparameters (JSON text), status, objective."""
    t = trials_view
    query = (
        select(t.c.trial_id, t.c.seed, t.c.status, t.c.hparams, t.c.objective, t.c.score,
               t.c.steps)
        .where(*filters.where(t), t.c.ranked == 1, t.c.method == method, *_board_where(board))
        .order_by(t.c.trial_id)
    )
    return _frame(connection, query)


def methods_on(connection: Connection, filters: Filters,
               board: tuple[str, str, str] | None) -> list[str]:
    """Methods with finished trials, the most searched (most configurations) first."""
    t = trials_view
    configs = func.count(distinct(t.c.config))
    query = (
        select(t.c.method).where(*filters.where(t), t.c.ranked == 1, *_board_where(board))
        .group_by(t.c.method).order_by(configs.desc(), t.c.method)
    )
    return list(connection.execute(query).scalars())


# -- Trial -------------------------------------------------------------------------------------

def trial_choices(connection: Connection, filters: Filters, limit: int) -> tuple[pd.DataFrame, int]:
    """Up to `limit` trials matching the filters, most recently started first, and how many match."""
    t = trials_view
    total = connection.execute(select(func.count()).select_from(t).where(*filters.where(t))).scalar_one()
    query = (
        select(t.c.trial_id, t.c.experiment, t.c.task, t.c.method, t.c.seed, t.c.status,
               t.c.objective)
        .where(*filters.where(t))
        .order_by(t.c.started_at.desc().nulls_last(), t.c.trial_id)
        .limit(limit)
    )
    return _frame(connection, query), int(total)


def experiments_of(connection: Connection, trial_id: str) -> list[str]:
    """The experiments holding a trial with this id (Ray's ids are unique within one only)."""
    t = trials_view
    query = select(t.c.experiment).where(t.c.trial_id == trial_id).order_by(t.c.experiment)
    return list(connection.execute(query).scalars())


def trial(connection: Connection, experiment: str, trial_id: str) -> dict[str, Any] | None:
    t = trials_view
    row = connection.execute(
        select(t).where(t.c.experiment == experiment, t.c.trial_id == trial_id)
    ).mappings().one_or_none()
    return None if row is None else dict(row)


def curves(connection: Connection, experiment: str, trial_id: str) -> pd.DataFrame:
    c = curves_view
    query = (
        select(c.c.step, c.c.name, c.c.value)
        .where(c.c.experiment == experiment, c.c.trial_id == trial_id)
        .order_by(c.c.name, c.c.step)
    )
    return _frame(connection, query)


# -- Bias --------------------------------------------------------------------------------------

BIAS_TRIAL = ("experiment", "task", "model", "domain", "metric", "mode", "method", "seed",
              "trial_id", "status", "hparams", "test_objective", "test_score")


def bias_scores(connection: Connection, filters: Filters) -> pd.DataFrame:
    """One row per finished trial that has bias scores: its BIAS_TRIAL columns and one column per
    `bias/<name>` and `bias_base/<name>` it carries (NaN where a trial lacks one).

    A trial writes its bias scores once, as curve points at the step of its last report, which is
    its `steps`. So the finished trials are listed first (the filters, the experiment's above all,
    narrow them on the trials table), and each reaches its points through trial_metrics' primary
    key (experiment_id, trial_id, step, name): one index seek per trial, never a scan of the
    curves' other points. MATERIALIZED keeps that order: without statistics, SQLite would
    otherwise walk every point of the experiment (or of the store) and look each trial up.
    """
    t, c = trials_view, curves_view
    finished = (select(t.c.experiment, t.c.trial_id, t.c.steps)
                .where(*filters.where(t), t.c.ranked == 1)
                .cte("finished").prefix_with("MATERIALIZED"))
    at_end = and_(c.c.experiment == finished.c.experiment, c.c.trial_id == finished.c.trial_id,
                  c.c.step == finished.c.steps)
    named = or_(c.c.name.startswith(BIAS, autoescape=True), c.c.name.startswith(BIAS_BASE, autoescape=True))
    points = _frame(connection, select(finished.c.experiment, finished.c.trial_id, c.c.name, c.c.value)
                    .select_from(finished.join(c, at_end)).where(named))
    if points.empty:
        return pd.DataFrame(columns=list(BIAS_TRIAL))
    # The trials' own columns once each, not once per point (a trial carries ~40 scores).
    scored = select(c.c.name).where(at_end, c.c.name.startswith(BIAS, autoescape=True)).exists()
    trials = _frame(connection, select(*(t.c[name] for name in BIAS_TRIAL))
                    .select_from(t.join(finished, and_(t.c.experiment == finished.c.experiment,
                                                       t.c.trial_id == finished.c.trial_id)))
                    .where(scored)
                    .order_by(*(t.c[name] for name in (*BOARD, "method", "seed", "trial_id"))))
    wide = points.pivot(index=["experiment", "trial_id"], columns="name", values="value")
    wide.columns.name = None
    return trials.merge(wide.reset_index(), on=["experiment", "trial_id"], how="inner")
