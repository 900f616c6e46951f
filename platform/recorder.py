"""A Ray Tune callback that records every trial in the results store and in MLflow.

It runs in the driver process, so both SQLite databases have exactly one writer; rows are
keyed by (experiment, Ray trial id) and upserted, so a retried or resumed trial never duplicates.
"""
from __future__ import annotations

import math
import re
from datetime import datetime, timezone
from pathlib import Path

from ray.tune import Callback

from peftlab import settings
from peftlab.search import TaskPlan
from peftlab.store import FINISHED, ResultsStore, TrialRecord, TrialStatus, test_metric
from peftlab.tracking import Tracker
from peftlab.workers.methods import get_method
from peftlab.workers.report import Outcome, TrialReport
from peftlab.workers.train import better
from peftlab.workers.trial import adapter_path, hparams_of, seed_of

COST_KEYS = ("trainable_params", "total_params", "trainable_pct", "adapter_bytes",
             "peak_memory_bytes", "train_seconds", "samples_per_second", "calibration_seconds")
MLFLOW_STATUS = {TrialStatus.COMPLETED: "FINISHED", TrialStatus.EARLY_STOPPED: "KILLED",
                 TrialStatus.FAILED: "FAILED"}


def error_reason(trial) -> str:
    """The last line of a failed trial's remote traceback, without the exception's module path."""
    # The error file is written locally first and synced to storage later, so read it there.
    path = Path(trial.error_file) if trial.error_file else None
    trace = path.read_text() if path and path.is_file() else trial.get_error()
    lines = [line.strip() for line in (trace or "").splitlines() if line.strip()]
    if not lines:
        return "trial failed without an error message"
    return re.sub(r"^(?:[\w]+\.)+(?=\w+(?:Error|Exception|Loss)?:)", "", lines[-1])


def _summary(record: TrialRecord) -> dict[str, float]:
    """The run's final/ metrics: the kept checkpoint's validation and test metrics and the costs."""
    summary = {k: v for k, v in (record.final_metrics or {}).items() if k != "step"}
    summary.update({k: getattr(record, k) for k in COST_KEYS if getattr(record, k) is not None})
    return summary


_CONNECTIONS: dict[str, tuple[ResultsStore, Tracker]] = {}


def bind(experiment: str, store: ResultsStore, tracker: Tracker) -> None:
    """Where the recorders of `experiment` write, in this driver process."""
    _CONNECTIONS[experiment] = (store, tracker)


class Recorder(Callback):
    """Writes trial rows, metric curves and MLflow runs as Tune reports them."""

    def __init__(self, *, experiment: str, model: str, task_plan: TaskPlan, seeds: list[int],
                 spec_hash: str, phase: str = "search", run_params: dict | None = None,
                 rung_board: str | None = None) -> None:
        self.experiment, self.model, self.plan, self.phase = experiment, model, task_plan, phase
        self.run_params = run_params or {}
        """How every trial trains (precision, accumulation...), logged beside its hyperparameters."""
        self.seeds, self.spec_hash = seeds, spec_hash
        self.rung_board = rung_board
        """The task's RungBoard actor name (rungs.py); trials are registered there as they start."""
        self.records: dict[str, TrialRecord] = {}
        self.runs: dict[str, str] = {}
        self.finished_before: set[str] = set()
        """Trials the store had as finished when Tune (restored) started them again: left alone."""
        self.stored: dict[str, int] = {}
        self.tracked: dict[str, int] = {}
        """Trial id -> the last step whose curve points are already in the store, in MLflow: a driver
        may die between the two writes, so each is counted on its own."""

    # Tune pickles its callbacks with the experiment state (for `peftlab resume`), so the
    # recorder holds no connection (nor any password): the driver binds them by name.
    @property
    def store(self) -> ResultsStore:
        return _CONNECTIONS[self.experiment][0]

    @property
    def tracker(self) -> Tracker:
        return _CONNECTIONS[self.experiment][1]


    def _board(self):
        import ray

        name = getattr(self, "rung_board", None)
        return ray.get_actor(name) if name else None

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        config = trial.config
        method = get_method(config["method"])
        board = self._board()
        if board is not None:
            # Tune numbers trials from 1 in the order the search created them, and keeps that tag on restore.
            index = int(str(trial.experiment_tag).split("_", 1)[0]) - 1
            board.register.remote(trial.trial_id, method.name, index)
        hparams = method.resolve(hparams_of(config))
        seed = seed_of(config, self.seeds)
        task = self.plan.task
        tags = {"peftlab.method": method.name, "peftlab.task": task.label,
                "peftlab.domain": task.domain or "", "peftlab.dataset": task.dataset,
                "peftlab.model": self.model, "peftlab.spec_hash": self.spec_hash,
                "peftlab.trial_id": trial.trial_id, "peftlab.phase": self.phase}
        # A trial restarted by `peftlab resume` keeps its row and its MLflow run.
        known = self.store.get_trial(self.experiment, trial.trial_id)
        if known is not None and known.status in FINISHED:
            self.finished_before.add(trial.trial_id)
            if board is not None:
                board.end.remote(trial.trial_id)
            if known.mlflow_run_id:
                # The driver may have died between the store's row and the MLflow run's end.
                adapter = adapter_path(settings.adapters_dir(), self.experiment, trial.trial_id)
                self.tracker.finish_if_running(known.mlflow_run_id, MLFLOW_STATUS[known.status],
                                               summary=_summary(known), artifact_dir=str(adapter))
            return
        # Its restart reports steps again from the first: each step's points are kept once.
        self.stored[trial.trial_id] = max((step for step, _, _ in self.store.metrics(self.experiment, trial.trial_id)),
                                          default=0)
        # Known from the store, or from MLflow alone when the driver died between the two writes.
        run_id = known.mlflow_run_id if known else self.tracker.find_run(trial.trial_id)
        if run_id:
            self.tracker.set_status(run_id, "RUNNING")  # an interrupted sweep left it KILLED
            self.tracked[trial.trial_id] = self.tracker.last_step(run_id)
        else:
            run_id = self.tracker.start_run(f"{task.label}-{method.name}-{trial.trial_id}", tags,
                                            {"method": method.name, "seed": seed, **hparams, **self.run_params})
        self.runs[trial.trial_id] = run_id
        if known is not None:
            # A retry or a resume continues from a checkpoint: what was evaluated before it stays.
            record = known
            record.status, record.mlflow_run_id = TrialStatus.RUNNING, run_id
        else:
            record = TrialRecord(
                trial_id=trial.trial_id, experiment=self.experiment, task=task.label,
                domain=task.domain, dataset=task.dataset, model=self.model, method=method.name,
                seed=seed, hparams=hparams, status=TrialStatus.RUNNING, mlflow_run_id=run_id,
                started_at=datetime.now(timezone.utc), final_metrics={}, best_metrics={},
            )
        self.records[trial.trial_id] = record
        self.store.upsert_trial(record)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        report = TrialReport.from_result(result)
        if report is None or trial.trial_id in self.finished_before:
            return
        record = self.records[trial.trial_id]
        if report.resumed_from is not None:
            self.tracker.set_tag(self.runs[trial.trial_id], "peftlab.resumed_from_step", str(report.resumed_from))
        curve = report.curve()
        if report.step > self.stored.get(trial.trial_id, 0):
            self.store.add_metrics(self.experiment, trial.trial_id, report.step, curve)
        if report.step > self.tracked.get(trial.trial_id, 0):
            self.tracker.log_metrics(self.runs[trial.trial_id], curve, report.step)
        if report.is_evaluation:
            scores = report.scores()
            value = scores.get(self.plan.metric)
            if better(value, record.best_metrics.get(self.plan.metric), self.plan.mode):
                record.best_metrics = {**scores, "step": report.step}
            record.steps = report.step  # steps trained as of its latest evaluation
            if report.is_final:
                # One number per trial and split from here on: the kept checkpoint's.
                selected = report.selected()
                value = selected.get(self.plan.metric)
                record.objective = float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
                record.test_objective = selected.get(test_metric(self.plan.metric))
                record.final_metrics = {**selected, "step": report.selected_step}
            else:
                # Until the trial ends, the best validation so far (the live display's number).
                record.objective = record.best_metrics.get(self.plan.metric)
                record.final_metrics = {**scores, "step": report.step}
        record.node = report.node
        costs = report.costs
        for key in COST_KEYS:
            value = getattr(costs, key)
            if value is not None:
                setattr(record, key, value)
        self.store.upsert_trial(record)

    def _finish(self, trial, status: TrialStatus, error: str | None = None) -> None:
        if trial.trial_id in self.finished_before:
            return
        record = self.records.get(trial.trial_id)
        if record is None:  # failed before it started (e.g. the actor could not be placed)
            self.on_trial_start(0, [], trial)
            record = self.records[trial.trial_id]
        record.status, record.error = status, error
        record.finished_at = datetime.now(timezone.utc)
        self.store.upsert_trial(record)
        board = self._board()
        if board is not None:
            board.end.remote(trial.trial_id)
        summary = _summary(record)
        last = TrialReport.from_result(trial.last_result)
        # With a tracking server the trial uploaded its adapter itself; else it is on this machine.
        artifact = last.adapter_path if last and not last.adapter_uri else None
        self.tracker.finish(self.runs[trial.trial_id], MLFLOW_STATUS[status], summary=summary, artifact_dir=artifact)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        # A trial that trained to its end says so; one a rung stopped says that.
        last = TrialReport.from_result(trial.last_result)
        finished = last is not None and last.outcome is Outcome.COMPLETED
        self._finish(trial, TrialStatus.COMPLETED if finished else TrialStatus.EARLY_STOPPED)

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        """The trial's process died and Tune starts it again (from its last checkpoint)."""
        record = self.records.get(trial.trial_id)
        if record is not None and trial.trial_id not in self.finished_before:
            record.restarts += 1
            self.store.upsert_trial(record)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._finish(trial, TrialStatus.FAILED, error_reason(trial))
