"""The record a trial sends the driver at each report: step, train loss, validation metrics, costs,
and, on its last report only, its outcome, its selected checkpoint's validation and test metrics and
where its adapter is. One typed shape for both paths."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

RECORD_KEY = "peftlab"
"""Where the record travels inside a Ray Tune result; the validation metrics the scheduler and the
search algorithm read are also copied to the top level, under their `validation/<name>` keys (test
metrics never are)."""
VALIDATION, TEST = "validation/", "test/"
RETENTION = ("drift", "forgetting")
"""Measured once, on the kept checkpoint, against the untouched model."""


class Outcome(str, Enum):
    COMPLETED = "completed"
    """The trial trained all its steps, was tested and saved its adapter."""
    EARLY_STOPPED = "early_stopped"
    """A rung stopped the trial; it was tested and saved its adapter like a completed one."""


@dataclass
class Costs:
    """What a trial spent so far (counts are known before training)."""

    trainable_params: int
    total_params: int
    train_seconds: float = 0.0
    samples_per_second: float = 0.0
    peak_memory_bytes: int = 0
    adapter_bytes: int | None = None
    calibration_seconds: float = 0.0
    """Time the method spent on the data before training (gradient passes, a first stage)."""

    @property
    def trainable_pct(self) -> float:
        return 100.0 * self.trainable_params / self.total_params if self.total_params else 0.0


@dataclass
class TrialReport:
    """One report of a running trial.

    A progress report (every `log_every` steps) has a train loss and no metrics; an evaluation
    report has metrics; the final report also has the outcome and the adapter's location.
    """

    step: int
    max_steps: int
    costs: Costs
    train_loss: float | None = None
    """Mean train loss over the steps since the previous report."""
    lr: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    """This evaluation's validation metrics by name (accuracy, loss...), without a split prefix."""
    outcome: Outcome | None = None
    selected_step: int | None = None
    """Last report: the step of the checkpoint the trial kept (training.select)."""
    selected_metrics: dict[str, float] = field(default_factory=dict)
    """Last report: that checkpoint's validation metrics, and retention (drift, forgetting)."""
    test_metrics: dict[str, float] = field(default_factory=dict)
    """Last report: that checkpoint's test metrics, evaluated once."""
    figures: dict[str, float] = field(default_factory=dict)
    """Last report: what was measured beside the splits, by prefixed name: the method's own
    (`calibration/...`, `pruning/...`) and bias scores of the kept checkpoint and of the untouched
    model (`bias/...`, `bias_base/...`)."""
    adapter_path: str | None = None
    """The adapter folder on the trial's node."""
    adapter_uri: str | None = None
    """Where the trial uploaded its adapter (an MLflow runs:/ URI); None where it did not."""
    resumed_from: int | None = None
    """On the first report after a restart: the checkpoint's step the trial continued after."""
    node: str | None = None

    @property
    def is_evaluation(self) -> bool:
        return bool(self.metrics)

    @property
    def is_final(self) -> bool:
        return self.outcome is not None

    def scores(self) -> dict[str, float]:
        """This evaluation's metrics under the names a spec's `search.metric` uses (validation/accuracy, ...)."""
        return {f"{VALIDATION}{k}": v for k, v in self.metrics.items()}

    def selected(self) -> dict[str, float]:
        """Last report: the kept checkpoint's validation and test metrics, prefixed, and the figures."""
        return {**{f"{VALIDATION}{k}": v for k, v in self.selected_metrics.items()},
                **{f"{TEST}{k}": v for k, v in self.test_metrics.items()}, **self.figures}

    def curve(self) -> dict[str, float]:
        """The points this report adds to the trial's metric curves; the last one adds the test
        metrics and retention once."""
        points = dict(self.scores())
        if self.train_loss is not None and math.isfinite(self.train_loss):
            points["train/loss"] = self.train_loss
        if self.is_final:
            points.update({f"{TEST}{k}": v for k, v in self.test_metrics.items()})
            points.update({f"{VALIDATION}{k}": v for k, v in self.selected_metrics.items() if k in RETENTION})
            points.update(self.figures)
        return points

    def to_result(self) -> dict[str, Any]:
        """The Ray Tune result: `step` and the scores where search algorithms look, the record beside
        them. The last report's scores are the kept checkpoint's, so Optuna learns the value of the
        configuration that is reported, not of its last evaluation."""
        record = asdict(self)
        record["outcome"] = self.outcome.value if self.outcome else None
        scores = self.scores()
        if self.is_final and self.selected_metrics:
            scores = {f"{VALIDATION}{k}": v for k, v in self.selected_metrics.items() if k not in RETENTION}
        return {"step": self.step, **scores, RECORD_KEY: record}

    @classmethod
    def from_result(cls, result: dict[str, Any]) -> TrialReport | None:
        """The record inside a Tune result; None for a result that carries none (Tune's own)."""
        record = (result or {}).get(RECORD_KEY)
        if not isinstance(record, dict):
            return None
        record = dict(record)
        record["costs"] = Costs(**record["costs"])
        record["outcome"] = Outcome(record["outcome"]) if record.get("outcome") else None
        return cls(**record)
