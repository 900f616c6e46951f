"""First use of a new results store or MLflow database by two processes at once (two `run`s, a
`run` and a `migrate`): both succeed, and the schema is made once. Real processes, started together."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, fresh_database

ROUNDS = 2

MIGRATE = """
import sys, time
from pathlib import Path
from peftlab.store import migrate
go = Path(sys.argv[1])
Path(f"{go}.{sys.argv[3]}").touch()  # imported: ready
while not go.exists():
    time.sleep(0.01)
migrate(sys.argv[2])
"""

TRACK = """
import sys, time
from pathlib import Path
from peftlab.tracking import Tracker
go = Path(sys.argv[1])
import mlflow.store.tracking.sqlalchemy_store  # noqa: F401  (the schema code, before the start)
Path(f"{go}.{sys.argv[3]}").touch()  # imported: ready
while not go.exists():
    time.sleep(0.01)
print(Tracker(sys.argv[2], "race").experiment_id)
"""


def together(script: str, go: Path, target: str) -> list[subprocess.CompletedProcess]:
    """Two processes that import everything, then wait for `go` and run at the same moment."""
    procs = [subprocess.Popen([sys.executable, "-c", script, str(go), target, str(i)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    deadline = time.monotonic() + 120
    while not all(Path(f"{go}.{i}").exists() for i in range(2)) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    outputs = [p.communicate(timeout=120) for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


def test_two_migrations_of_a_new_sqlite_store_at_once(tmp_path):
    from peftlab.store import ResultsStore

    for i in range(ROUNDS):
        url = f"sqlite:///{tmp_path / f'results-{i}.db'}"
        done = together(MIGRATE, tmp_path / f"go-{i}", url)
        assert [d.returncode for d in done] == [0, 0], [d.stderr[-2000:] for d in done]
        ResultsStore(url, migrate=False)  # at the current schema, or this raises


@pytest.mark.postgres
def test_two_migrations_of_a_new_postgres_store_at_once(tmp_path):
    from peftlab.store import ResultsStore

    for i in range(2):
        with fresh_database("peftlab_race") as name:
            url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
            done = together(MIGRATE, tmp_path / f"go-{i}", url)
            assert [d.returncode for d in done] == [0, 0], [d.stderr[-2000:] for d in done]
            ResultsStore(url, migrate=False).close()


def test_two_drivers_on_a_new_mlflow_database_at_once(tmp_path):
    for i in range(ROUNDS):
        done = together(TRACK, tmp_path / f"go-{i}", f"sqlite:///{tmp_path / f'mlflow-{i}.db'}")
        assert [d.returncode for d in done] == [0, 0], [d.stderr[-2000:] for d in done]
        ids = {d.stdout.strip() for d in done}
        assert len(ids) == 1 and ids != {""}  # one experiment, found by both
