"""Results store against SQLite and PostgreSQL: migrations, idempotent writes, leaderboard, errors.

Each PostgreSQL test gets its own throwaway database, so tests never see each other's rows.
"""
from __future__ import annotations

import math
import sqlite3
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, make_url
from sqlalchemy.exc import DBAPIError

from peftlab.errors import UserError
from peftlab.store import (
    ExperimentStatus,
    ResultsStore,
    TrialRecord,
    TrialStatus,
    migrate,
)
from peftlab.store import _alembic_config
from peftlab.store_models import Base



@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_url(request: pytest.FixtureRequest, tmp_path) -> str:
    """URL of an empty database: a SQLite file, or a fresh PostgreSQL database dropped after."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'runs' / 'results.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def store(empty_url: str) -> Iterator[ResultsStore]:
    store = ResultsStore(empty_url)
    yield store
    store.close()


def make_experiment(store: ResultsStore, name: str = "sweep", mode: str = "max") -> None:
    store.create_experiment(
        name, {"name": name}, "hash-1", "validation/accuracy", mode, "abc123", {"torch": "2.13.0"}
    )


def make_trial(trial_id: str, **changes) -> TrialRecord:
    values = dict(
        trial_id=trial_id,
        experiment="sweep",
        task="sst2",
        domain="nlp/sentiment",
        dataset="sst2",
        model="minilm",
        method="lora",
        seed=0,
        hparams={"r": 8, "lr": 1e-3},
        status=TrialStatus.COMPLETED,
        trainable_params=1_000,
        total_params=22_000_000,
        trainable_pct=0.0045,
        objective=0.5,
    )
    return TrialRecord(**{**values, **changes})


def test_migration_creates_tables_and_second_open_is_a_noop(empty_url: str) -> None:
    ResultsStore(empty_url).close()
    migrate(empty_url)
    engine = create_engine(empty_url)
    with engine.connect() as connection:
        tables = set(inspect(connection).get_table_names())
        assert {"experiments", "trials", "trial_metrics"} <= tables
        heads = ScriptDirectory.from_config(_alembic_config(connection)).get_heads()
        assert MigrationContext.configure(connection).get_current_heads() == tuple(heads)
    engine.dispose()


def test_migration_matches_models(store: ResultsStore, empty_url: str) -> None:
    engine = create_engine(empty_url)
    with engine.connect() as connection:
        database = {
            table: {column["name"] for column in inspect(connection).get_columns(table)}
            for table in ("experiments", "trials", "trial_metrics")
        }
        # Beyond names: types, nullability, indexes and foreign keys, as autogenerate sees them.
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    engine.dispose()
    models = {name: {c.name for c in table.columns} for name, table in Base.metadata.tables.items()}
    assert database == models


def test_unmigrated_database_is_refused_with_the_fix(empty_url: str) -> None:
    url = make_url(empty_url)
    if url.get_backend_name() == "postgresql":
        url = url.set(password="s3cret")  # trust auth ignores it; the message must hide it
    fix = "not at the current schema; run: peftlab migrate --store"
    with pytest.raises(UserError, match=fix) as caught:
        ResultsStore(url.render_as_string(hide_password=False), migrate=False)
    assert "s3cret" not in str(caught.value)


@pytest.mark.timeout(30)  # a refused port must fail at once, not hang
def test_unreachable_postgres_is_a_user_error() -> None:
    with pytest.raises(UserError, match="cannot reach results store") as caught:
        ResultsStore("postgresql+psycopg://postgres:s3cret@127.0.0.1:1/none")
    assert "s3cret" not in str(caught.value) and "\n" not in str(caught.value)


def test_sqlite_store_is_in_wal_mode(tmp_path) -> None:
    path = tmp_path / "results.db"
    ResultsStore(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_create_experiment_is_idempotent_for_the_same_spec_only(store: ResultsStore) -> None:
    make_experiment(store)
    make_experiment(store)
    assert [e.name for e in store.experiments()] == ["sweep"]
    record = store.get_experiment("sweep")
    assert record.status is ExperimentStatus.RUNNING and record.created_at.tzinfo == timezone.utc
    with pytest.raises(UserError, match="peftlab resume sweep"):
        store.create_experiment("sweep", {}, "hash-2", "validation/accuracy", "max", "abc123", {})
    store.set_experiment_status("sweep", ExperimentStatus.COMPLETED)
    assert store.get_experiment("sweep").status is ExperimentStatus.COMPLETED


def test_upsert_trial_is_idempotent_and_last_write_wins(store: ResultsStore) -> None:
    make_experiment(store)
    started = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    pending = TrialRecord(
        trial_id="t1", experiment="sweep", task="sst2", dataset="sst2", model="minilm",
        method="lora", seed=0, hparams={}, status=TrialStatus.PENDING,
    )
    store.upsert_trial(pending)
    assert store.get_trial("sweep", "t1") == pending
    store.upsert_trial(make_trial("t1", status=TrialStatus.RUNNING, started_at=started))
    failed = make_trial(
        "t1", status=TrialStatus.FAILED, error="OOM", objective=0.7, started_at=started, node="n1"
    )
    store.upsert_trial(failed)
    [trial] = store.trials("sweep")
    assert trial == failed
    assert store.get_trial("sweep", "t1") == trial and store.get_trial("sweep", "missing") is None
    assert store.trials(status=TrialStatus.RUNNING) == []


def test_non_finite_values_are_stored_as_null(store: ResultsStore) -> None:
    make_experiment(store)
    store.upsert_trial(
        make_trial("t1", objective=math.nan, final_metrics={"loss": math.inf, "acc": 0.5})
    )
    trial = store.get_trial("sweep", "t1")
    assert trial.objective is None and trial.final_metrics == {"loss": None, "acc": 0.5}
    store.add_metrics("sweep", "t1", 10, {"loss": math.nan})
    assert store.metrics("sweep", "t1") == [(10, "loss", None)]


def test_add_metrics_replaces_a_rewritten_point(store: ResultsStore) -> None:
    make_experiment(store)
    store.upsert_trial(make_trial("t1"))
    store.add_metrics("sweep", "t1", 1, {"loss": 1.0, "validation/accuracy": 0.5})
    store.add_metrics("sweep", "t1", 1, {"loss": 0.9})
    store.add_metrics("sweep", "t1", 2, {"loss": 0.8})
    assert store.metrics("sweep", "t1") == [(1, "loss", 0.9), (1, "validation/accuracy", 0.5), (2, "loss", 0.8)]


@pytest.mark.parametrize("mode", ["max", "min"])
def test_leaderboard_picks_best_finished_trial_per_pair(store: ResultsStore, mode: str) -> None:
    make_experiment(store, mode=mode)
    trials = [
        make_trial("a", method="lora", objective=0.6),
        make_trial("b", method="lora", objective=0.8, status=TrialStatus.EARLY_STOPPED),
        make_trial("c", method="lora", objective=0.7),
        make_trial("d", method="lora", objective=0.99, status=TrialStatus.FAILED),
        make_trial("e", method="lora", objective=0.01, status=TrialStatus.FAILED),
        make_trial("i", method="lora", objective=0.02, status=TrialStatus.RUNNING),
        make_trial("f", method="bitfit", objective=0.65),
        make_trial("g", method="bitfit", objective=None),
        make_trial("h", task="mnli", method="lora", objective=0.4),
    ]
    for trial in trials:
        store.upsert_trial(trial)
    board = store.leaderboard("sweep")
    best_lora = "b" if mode == "max" else "a"
    assert [(row.task, row.method, row.trial_id, row.n_trials) for row in board] == [
        ("mnli", "lora", "h", 1),
        ("sst2", "lora", best_lora, 3),
        ("sst2", "bitfit", "f", 1),
    ]
    best_status = TrialStatus.EARLY_STOPPED if mode == "max" else TrialStatus.COMPLETED
    assert board[1].status is best_status and board[1].hparams == {"r": 8, "lr": 1e-3}
    with pytest.raises(UserError, match="no experiment named"):
        store.leaderboard("typo")


def test_delete_experiment_cascades_to_trials_and_metrics(store: ResultsStore, empty_url: str) -> None:
    make_experiment(store)
    store.upsert_trial(make_trial("t1"))
    store.add_metrics("sweep", "t1", 1, {"loss": 1.0})
    store.delete_experiment("sweep")
    assert store.get_experiment("sweep") is None
    assert store.trials() == [] and store.metrics("sweep", "t1") == []
    engine = create_engine(empty_url)
    with engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT COUNT(*) FROM trial_metrics").scalar_one() == 0
    engine.dispose()


def test_a_trial_id_is_unique_within_its_experiment_only(store: ResultsStore) -> None:
    make_experiment(store, "first")
    make_experiment(store, "second")
    store.upsert_trial(make_trial("t1", experiment="first", objective=0.1))
    store.upsert_trial(make_trial("t1", experiment="second", objective=0.2))
    store.add_metrics("first", "t1", 1, {"loss": 1.0})
    store.add_metrics("second", "t1", 1, {"loss": 2.0})
    # Ray reuses 8-hex ids across experiments: each keeps its own row and its own curve.
    assert [(t.experiment, t.objective) for t in store.trials()] == [("first", 0.1), ("second", 0.2)]
    assert store.get_trial("first", "t1").objective == 0.1
    assert store.metrics("second", "t1") == [(1, "loss", 2.0)]
    store.delete_experiment("first")
    assert [(t.experiment, t.trial_id) for t in store.trials()] == [("second", "t1")]
    assert store.metrics("second", "t1") == [(1, "loss", 2.0)]


def test_migration_0003_keeps_the_rows_of_an_older_store(empty_url: str) -> None:
    from alembic import command

    if empty_url.startswith("sqlite:///"):
        Path(empty_url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(empty_url)
    with engine.begin() as connection:
        command.upgrade(_alembic_config(connection), "0002")
        connection.exec_driver_sql(
            "INSERT INTO experiments (id, name, spec, spec_hash, created_at, updated_at, status, metric, mode, "
            "code_version, package_versions) VALUES (7, 'old', '{}', 'h', '2025-01-01 00:00:00+00:00', "
            "'2025-01-01 00:00:00+00:00', 'COMPLETED', 'validation/accuracy', 'max', 'abc', '{}')")
        connection.exec_driver_sql(
            "INSERT INTO trials (trial_id, experiment_id, task, dataset, model, method, seed, hparams, status, "
            "objective, final_metrics, best_metrics) VALUES ('a1b2c3d4', 7, 'sst2', 'sst2', 'minilm', 'lora', 0, "
            "'{\"r\": 8}', 'COMPLETED', 0.9, '{}', '{}')")
        connection.exec_driver_sql(
            "INSERT INTO trial_metrics (trial_id, step, name, value) VALUES ('a1b2c3d4', 5, 'validation/accuracy', 0.9)")
    engine.dispose()

    store = ResultsStore(empty_url)  # migrates to the current revision
    [trial] = store.trials("old")
    assert (trial.trial_id, trial.hparams, trial.objective, trial.restarts) == ("a1b2c3d4", {"r": 8}, 0.9, 0)
    assert store.metrics("old", "a1b2c3d4") == [(5, "validation/accuracy", 0.9)]
    store.close()
    engine = create_engine(empty_url)
    with engine.connect() as connection:
        curves = connection.exec_driver_sql("SELECT experiment, trial_id, step FROM dashboard_curves").all()
        assert [tuple(row) for row in curves] == [("old", "a1b2c3d4", 5)]
        assert connection.exec_driver_sql("SELECT COUNT(*) FROM dashboard_trials").scalar_one() == 1
    engine.dispose()


def test_read_only_store_refuses_writes(store: ResultsStore, empty_url: str) -> None:
    make_experiment(store)
    reader = ResultsStore(empty_url, read_only=True)
    assert [e.name for e in reader.experiments()] == ["sweep"]
    with pytest.raises(DBAPIError):
        reader.upsert_trial(make_trial("t1"))
    reader.close()


def test_readers_leave_a_sqlite_store_byte_identical(tmp_path):
    """The dashboard's checks and queries and a read-only ResultsStore on a DELETE-journal file:
    not one byte changes and no -wal / -shm file appears."""
    import hashlib
    import sqlite3

    from peftlab.dashboard import queries

    path = tmp_path / "results.db"
    url = f"sqlite:///{path}"
    writer = ResultsStore(url)
    writer.create_experiment("x", {"name": "x"}, "h", "validation/accuracy", "max", "v", {})
    writer.close()
    connection = sqlite3.connect(path)
    assert connection.execute("PRAGMA journal_mode=DELETE").fetchone() == ("delete",)
    connection.close()
    before = hashlib.sha256(path.read_bytes()).hexdigest()

    queries.check_store(url)
    engine = queries.open_engine(url)
    with engine.connect() as reader:
        assert "x" in queries.filter_options(reader)["experiment"]
    engine.dispose()
    reader_store = ResultsStore(url, migrate=False, read_only=True)
    assert reader_store.get_experiment("x").spec_hash == "h"
    with pytest.raises(Exception):
        reader_store.set_experiment_status("x", ExperimentStatus.FAILED)
    reader_store.close()

    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.db"]


def test_migration_0003_downgrades_only_while_trial_ids_are_unique(empty_url: str) -> None:
    from alembic import command

    store = ResultsStore(empty_url)
    make_experiment(store, "first")
    make_experiment(store, "second")
    store.upsert_trial(make_trial("t1", experiment="first"))
    store.add_metrics("first", "t1", 1, {"loss": 1.0})
    store.upsert_trial(make_trial("t1", experiment="second"))
    store.close()
    engine = create_engine(empty_url)
    with engine.begin() as connection, pytest.raises(RuntimeError, match="t1 is in more than one experiment"):
        command.downgrade(_alembic_config(connection), "0002")
    ResultsStore(empty_url).delete_experiment("second")
    with engine.begin() as connection:
        command.downgrade(_alembic_config(connection), "0002")
        assert connection.exec_driver_sql("SELECT trial_id, step FROM trial_metrics").all() == [("t1", 1)]
        assert connection.exec_driver_sql("SELECT COUNT(*) FROM dashboard_curves").scalar_one() == 1
    engine.dispose()


def test_migration_0004_makes_the_old_evaluation_the_validation_split(empty_url: str) -> None:
    """A store from before test splits: its eval/ metrics were the search's split, so they become
    validation/; its trials have no test score, which reads as missing (NULL), not zero."""
    from alembic import command

    if empty_url.startswith("sqlite:///"):
        Path(empty_url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(empty_url)
    with engine.begin() as connection:
        command.upgrade(_alembic_config(connection), "0003")
        connection.exec_driver_sql(
            "INSERT INTO experiments (id, name, spec, spec_hash, created_at, updated_at, status, metric, mode, "
            "code_version, package_versions) VALUES (3, 'old', '{}', 'h', '2025-01-01 00:00:00+00:00', "
            "'2025-01-01 00:00:00+00:00', 'COMPLETED', 'eval/accuracy', 'max', 'abc', '{}')")
        connection.exec_driver_sql(
            "INSERT INTO trials (trial_id, experiment_id, task, dataset, model, method, seed, hparams, status, "
            "objective, final_metrics, best_metrics) VALUES ('t1', 3, 'sst2', 'sst2', 'minilm', 'lora', 0, "
            "'{}', 'COMPLETED', 0.9, '{\"eval/accuracy\": 0.9, \"step\": 5}', '{\"eval/accuracy\": 0.9}')")
        connection.exec_driver_sql(
            "INSERT INTO trial_metrics (experiment_id, trial_id, step, name, value) VALUES "
            "(3, 't1', 5, 'eval/accuracy', 0.9), (3, 't1', 5, 'train/loss', 0.4)")
    engine.dispose()

    store = ResultsStore(empty_url)
    assert store.get_experiment("old").metric == "validation/accuracy"
    [trial] = store.trials("old")
    assert trial.final_metrics == {"validation/accuracy": 0.9, "step": 5}
    assert trial.best_metrics == {"validation/accuracy": 0.9} and trial.test_objective is None
    assert store.metrics("old", "t1") == [(5, "train/loss", 0.4), (5, "validation/accuracy", 0.9)]
    [row] = store.leaderboard("old")
    assert (row.objective, row.test_objective) == (0.9, None)
    store.add_metrics("old", "t1", 5, {"test/accuracy": 0.8})
    store.close()
    engine = create_engine(empty_url)
    with engine.begin() as connection:
        view = connection.exec_driver_sql("SELECT objective, test_objective FROM dashboard_trials").all()
        assert [tuple(r) for r in view] == [(0.9, None)]
        command.downgrade(_alembic_config(connection), "0003")
        names = connection.exec_driver_sql("SELECT name FROM trial_metrics ORDER BY name").scalars().all()
        assert names == ["eval/accuracy", "train/loss"]  # test points have no place there
        assert connection.exec_driver_sql("SELECT metric FROM experiments").scalar_one() == "eval/accuracy"
        assert connection.exec_driver_sql("SELECT COUNT(*) FROM dashboard_trials").scalar_one() == 1
    engine.dispose()
