"""MLflow tracking: one MLflow experiment per peftlab experiment, one run per trial.

All logging happens in the driver process (see `recorder.py`), so a SQLite tracking
database has a single writer and never hits "database is locked" (mlflow issue #6490); only
with a tracking server do trials upload their own adapters (workers/trial.py, `publisher`).
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from peftlab.errors import UserError


class Tracker:
    """A thin layer over `MlflowClient` that knows peftlab's naming and tags."""

    def __init__(self, uri: str, experiment: str, *, artifact_root: Path | None = None) -> None:
        from mlflow.tracking import MlflowClient

        for name in ("alembic", "mlflow"):  # mlflow logs its own schema migration at INFO
            logging.getLogger(name).setLevel(logging.WARNING)
        if uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.uri = uri
        try:
            with _creation_lock(uri):
                self.client = MlflowClient(tracking_uri=uri)
                self.experiment_id = self._experiment_id(experiment, artifact_root)
        except Exception as exc:  # mlflow raises many types for an unreachable backend
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"cannot reach MLflow tracking at {uri}: {reason[:200]}") from None

    def _experiment_id(self, experiment: str, artifact_root: Path | None) -> str:
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            return found.experiment_id
        # A tracking server decides where artifacts go (its --artifacts-destination, reached
        # through it); only a local backend gets a folder of ours.
        served = self.uri.startswith(("http://", "https://"))
        location = (artifact_root / experiment).resolve().as_uri() if artifact_root and not served else None
        try:
            return self.client.create_experiment(experiment, artifact_location=location)
        except Exception:
            found = self.client.get_experiment_by_name(experiment)  # another driver created it first
            if found is None:
                raise
            return found.experiment_id

    def start_run(self, name: str, tags: dict[str, str], params: dict[str, Any]) -> str:
        from mlflow.entities import Param

        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
        return run.info.run_id

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = _now_ms()
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if _finite(v)]
        if batch:
            self.client.log_batch(run_id, metrics=batch)

    def finish(self, run_id: str, status: str, *, summary: dict[str, float], artifact_dir: str | None) -> None:
        """status: FINISHED, KILLED (early-stopped) or FAILED, as MLflow names them."""
        from mlflow.entities import Metric

        now = _now_ms()
        final = [Metric(f"final/{k}", float(v), now, 0) for k, v in summary.items() if _finite(v)]
        if final:
            self.client.log_batch(run_id, metrics=final)
        if artifact_dir and Path(artifact_dir).is_dir():
            self.client.log_artifacts(run_id, artifact_dir, artifact_path="adapter")
        self.client.set_terminated(run_id, status=status)

    def finish_if_running(self, run_id: str, status: str, *, summary: dict[str, float], artifact_dir: str) -> None:
        """End a run that a finished trial left RUNNING; its adapter only where none is logged yet."""
        if self.client.get_run(run_id).info.status != "RUNNING":
            return
        logged = self.client.list_artifacts(run_id, "adapter")
        self.finish(run_id, status, summary=summary, artifact_dir=None if logged else artifact_dir)

    def find_run(self, trial_id: str) -> str | None:
        """The run of this experiment's trial, if one was started."""
        found = self.client.search_runs([self.experiment_id], filter_string=f"tags.`peftlab.trial_id` = '{trial_id}'",
                                        max_results=1)
        return found[0].info.run_id if found else None

    def last_step(self, run_id: str) -> int:
        """The highest step of the run's metric curves (0 for none; final/ values are not curves)."""
        keys = [key for key in self.client.get_run(run_id).data.metrics if not key.startswith("final/")]
        return max((m.step for key in keys for m in self.client.get_metric_history(run_id, key)), default=0)

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self.client.set_tag(run_id, key, value)

    def set_status(self, run_id: str, status: str) -> None:
        """RUNNING again when a trial restarts, KILLED when its sweep was interrupted."""
        if status == "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
        else:
            self.client.set_terminated(run_id, status=status)


@contextlib.contextmanager
def _creation_lock(uri: str) -> Iterator[None]:
    """For a SQLite tracking database: one process at a time opens it the first time. MLflow's
    schema migrations are not atomic on SQLite (a loser of the race leaves a half-made table
    behind), so two drivers starting on a new database take turns, the second finding it made."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock = Path(uri.removeprefix("sqlite:///") + ".lock")
    with lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _now_ms() -> int:
    return int(time.time() * 1000)
