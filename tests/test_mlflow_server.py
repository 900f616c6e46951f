"""The cluster's shared services for real: an `mlflow server` on PostgreSQL and the results
store on PostgreSQL, fed by one sweep whose trials run two at a time.

The sweep logs through the tracking server's REST API, as a cluster driver does; the tests
then read everything back through the server and check that no trial's run went missing.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import fresh_database
from peftlab.store import ResultsStore, TrialRecord, TrialStatus
from peftlab.workers.methods.base import ADAPTER_META

ROOT = Path(__file__).resolve().parent.parent
MLFLOW = Path(sys.executable).with_name("mlflow")
EXPERIMENT = "shared-services"

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.timeout(300)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass  # not listening yet
        time.sleep(0.5)
    pytest.fail(f"mlflow server not healthy after {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    """A real `mlflow server` on its own PostgreSQL database, artifacts proxied by it."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = folder / "server.log"
    with fresh_database("peftlab_mlflow") as name, log.open("w") as out:
        # psycopg 3 is the project's PostgreSQL driver, so the server uses it too (plain
        # postgresql:// would need psycopg2). Two workers: the sweep needs the CPUs.
        server = subprocess.Popen(
            [str(MLFLOW), "server",
             "--backend-store-uri", f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}",
             "--serve-artifacts", "--artifacts-destination", (folder / "artifacts").as_uri(),
             "--default-artifact-root", "mlflow-artifacts:/",
             "--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_healthy(url, server, log)
            yield url
        finally:
            # The server runs its uvicorn workers in its own session: end the whole group. A
            # graceful stop can wait on idle keep-alive connections, hence the short grace.
            os.killpg(server.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(timeout=5)
            with contextlib.suppress(ProcessLookupError):  # whatever of the group is left
                os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@dataclass
class Sweep:
    trials: list[TrialRecord]
    tracking_uri: str
    folder: Path


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_bert_dir, sentiment_csv, mlflow_server) -> Iterator[Sweep]:
    """Five trials, grid order, two running at a time; FIFO, so every one finishes."""
    folder = tmp_path_factory.mktemp("sweep")
    spec = {
        "name": EXPERIMENT,
        "model": str(tiny_bert_dir),
        "tasks": [{"dataset": str(sentiment_csv), "max_train_samples": 64, "max_eval_samples": 32}],
        "methods": {
            "lora": {"r": [2, 4], "lr": 1.0e-3},
            "bitfit": {"lr": [1.0e-3, 1.0e-2]},
            "full": {"lr": 1.0e-4},
        },
        "search": {"algorithm": "grid", "scheduler": "fifo", "metric": "validation/accuracy", "mode": "max",
                   "max_concurrent": 2},
        "training": {"max_steps": 6, "eval_every": 3, "batch_size": 8, "seeds": [0]},
        "resources": {"cpus_per_trial": 1},
    }
    spec_path = folder / "shared.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    home = folder / "runs"
    env = {**os.environ, "PEFTLAB_HOME": str(home)}
    for name in ("PEFTLAB_STORE_URL", "MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        env.pop(name, None)

    with fresh_database("peftlab_store") as name:
        store_url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
        done = subprocess.run(
            [sys.executable, "-m", "peftlab.cli", "run", str(spec_path),
             "--store", store_url, "--tracking-uri", mlflow_server],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        assert not (home / "mlflow.db").exists() and not (home / "results.db").exists()
        yield Sweep(ResultsStore(store_url).trials(EXPERIMENT), mlflow_server, folder)


def test_every_concurrent_trial_has_exactly_one_complete_run_on_the_server(sweep):
    from mlflow.tracking import MlflowClient

    trials = sweep.trials
    assert len(trials) == 5 and all(t.status is TrialStatus.COMPLETED for t in trials)
    started = sorted(t.started_at for t in trials)
    finished = sorted(t.finished_at for t in trials)
    assert started[1] < finished[0], "no two trials overlapped: concurrency was not exercised"

    client = MlflowClient(tracking_uri=sweep.tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    assert len(runs) == len(trials), [r.info.run_id for r in runs]
    by_trial = {r.data.tags["peftlab.trial_id"]: r for r in runs}
    assert set(by_trial) == {t.trial_id for t in trials}

    for trial in trials:
        run = by_trial[trial.trial_id]
        assert run.info.run_id == trial.mlflow_run_id
        assert run.info.status == "FINISHED"
        assert run.data.tags["peftlab.method"] == trial.method
        assert run.data.metrics["final/validation/accuracy"] == pytest.approx(trial.final_metrics["validation/accuracy"])
        assert "final/validation/loss" in run.data.metrics
        assert [m.step for m in client.get_metric_history(run.info.run_id, "validation/accuracy")] == [3, 6]
        local = Path(client.download_artifacts(run.info.run_id, "adapter", str(sweep.folder / trial.trial_id)))
        files = {str(p.relative_to(local)): p.stat().st_size for p in local.rglob("*") if p.is_file()}
        assert files and sum(files.values()) == trial.adapter_bytes, files


def test_adapters_are_stored_behind_the_server(sweep):
    # On a cluster the driver's disk is out of reach of the MLflow server and the browser:
    # artifacts must go through the server's proxy (mlflow-artifacts:/) to be seen at all.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=sweep.tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment.artifact_location.startswith("mlflow-artifacts:"), experiment.artifact_location
    for trial in sweep.trials:
        url = (f"{sweep.tracking_uri}/api/2.0/mlflow-artifacts/artifacts/{experiment.experiment_id}"
               f"/{trial.mlflow_run_id}/artifacts/adapter/{ADAPTER_META}")
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200 and response.read()
