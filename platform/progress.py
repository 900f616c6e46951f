"""Live progress of a sweep in the terminal, and the leaderboard printed at its end.

The progress callback counts trials by state and tracks the best result so far; each
finished trial also gets one plain line, so logs read well where there is no terminal.
"""
from __future__ import annotations

import math
import sys
import time

from ray.tune import Callback
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from peftlab.search import TaskPlan
from peftlab.store import BIAS, BIAS_BASE, HEADLINE_BIAS, LeaderboardRow, TrialStatus
from peftlab.workers.report import Outcome, TrialReport


def _short(hparams: dict) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    return " ".join(f"{k}={fmt(v)}" for k, v in hparams.items())


class SweepProgress(Callback):
    """Pending / running / done / early-stopped / failed, the best so far and the elapsed time
    (re-drawn every second), and one row per running trial: its step, throughput and last scores."""

    def __init__(self, task_plan: TaskPlan) -> None:
        self.plan = task_plan
        self.state: dict[str, str] = {}
        self.running: dict[str, tuple[str, TrialReport | None, TrialReport | None]] = {}
        """trial id -> (method and config, its latest report, its latest evaluation)."""
        self.best: tuple[float, str] | None = None
        self.started = time.monotonic()
        self._live: Live | None = None

    # Tune pickles callbacks with the experiment state; the terminal is not picklable.
    def __getstate__(self) -> dict:
        return {**self.__dict__, "_live": None}

    @property
    def console(self) -> Console:
        return self.live.console

    @property
    def live(self) -> Live:
        if self._live is None:
            # get_renderable: every refresh re-draws, so the clock ticks between reports.
            self._live = Live(get_renderable=self._render, console=Console(width=None if sys.stdout.isatty() else 160),
                              refresh_per_second=1, transient=True)
        return self._live

    def _render(self) -> Group:
        counts = {s: list(self.state.values()).count(s) for s in ("running", "done", "early-stopped", "failed")}
        pending = self.plan.num_trials - len(self.state)
        table = Table(title=f"{self.plan.task.label}: {self.plan.metric} ({self.plan.mode})", title_justify="left")
        for column in ("pending", "running", "done", "early-stopped", "failed", "best so far", "elapsed"):
            table.add_column(column)
        best = f"{self.best[0]:.4f}  {self.best[1]}" if self.best else "-"
        elapsed = f"{time.monotonic() - self.started:.0f}s"
        table.add_row(str(pending), *(str(counts[s]) for s in counts), best, elapsed)
        if not self.running:
            return Group(table)
        trials = Table(box=None, pad_edge=False)
        for column in ("trial", "step", "samples/s", "train loss", self.plan.metric):
            trials.add_column(column)
        for name, report, evaluation in list(self.running.values()):
            if report is None:
                trials.add_row(name, "starting", "-", "-", "-")
                continue
            loss = f"{report.train_loss:.4f}" if report.train_loss is not None else "-"
            trials.add_row(name, f"{report.step}/{report.max_steps}", f"{report.costs.samples_per_second:.1f}",
                           loss, self._score(evaluation))
        return Group(table, trials)

    def _score(self, evaluation: TrialReport | None) -> str:
        value = evaluation.scores().get(self.plan.metric) if evaluation is not None else None
        return f"{value:.4f} at {evaluation.step}" if isinstance(value, (int, float)) else "-"

    def _update(self) -> None:
        self.live.refresh()

    def setup(self, **info) -> None:
        self.live.start()

    def on_step_begin(self, iteration, trials, **info) -> None:
        self._count_finished(trials)

    def _count_finished(self, trials) -> None:
        """Trials that finished before a restore are in Tune's list but sent this (restored)
        display nothing: count them, and take the best so far from their results."""
        for trial in trials:
            if trial.trial_id in self.state or trial.status not in ("TERMINATED", "ERROR"):
                continue
            last = TrialReport.from_result(trial.last_result)
            self.state[trial.trial_id] = ("failed" if trial.status == "ERROR" else
                                          "done" if last is not None and last.outcome is Outcome.COMPLETED
                                          else "early-stopped")
            value = (trial.metric_analysis.get(self.plan.metric) or {}).get(self.plan.mode)
            if isinstance(value, (int, float)) and math.isfinite(value):
                if self.best is None or (value > self.best[0] if self.plan.mode == "max" else value < self.best[0]):
                    self.best = (value, trial.config["method"])

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.state[trial.trial_id] = "running"
        config = trial.config
        self.running[trial.trial_id] = (f"{config['method']} {_short(config.get(config['method'], {}))}", None, None)
        self._update()

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        report = TrialReport.from_result(result)
        if report is None:
            return
        name, _, evaluation = self.running.get(trial.trial_id, (trial.config["method"], None, None))
        # Between evaluations the last one's score stays on screen.
        self.running[trial.trial_id] = (name, report, report if report.is_evaluation else evaluation)
        value = result.get(self.plan.metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            if self.best is None or (value > self.best[0] if self.plan.mode == "max" else value < self.best[0]):
                self.best = (value, trial.config["method"])
        self._update()

    def _line(self, trial, state: str, detail: str) -> None:
        self.state[trial.trial_id] = state
        self.running.pop(trial.trial_id, None)
        config = trial.config
        self.console.print(f"  {state:<13} {config['method']:<14} {_short(config.get(config['method'], {}))}  {detail}",
                           highlight=False)
        self._update()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        last = TrialReport.from_result(trial.last_result)
        state = "done" if last is not None and last.outcome is Outcome.COMPLETED else "early-stopped"
        if last is not None and last.outcome is not None and last.selected_step is not None:
            # The trial's one number per split: its kept checkpoint's.
            kept = last.selected()
            tested = self.plan.metric.replace("validation/", "test/", 1)
            value, test = kept.get(self.plan.metric), kept.get(tested)
            detail = (f"{self.plan.metric}={'-' if value is None else f'{value:.4f}'} (kept step "
                      f"{last.selected_step}), {tested}={'-' if test is None else f'{test:.4f}'}")
        else:
            _, _, evaluation = self.running.get(trial.trial_id, ("", None, None))
            detail = f"{self.plan.metric}={self._score(evaluation)}"
        self._line(trial, state, detail)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        from peftlab.recorder import error_reason

        log = trial.error_file or getattr(trial, "local_path", None)
        self._line(trial, "failed", error_reason(trial) + (f"  (log: {log})" if log else ""))

    def on_experiment_end(self, trials, **info) -> None:
        self._count_finished(trials)  # a restored experiment with nothing left to run
        self.live.stop()
        self.console.print(self._render())


def leaderboard_table(rows: list[LeaderboardRow], metric: str | None = None) -> Table:
    """The best trial per method; a calibration column where a method spent time on the data before
    training, the pruned share where one pruned, and each headline bias score as `adapted (base)`."""
    table = Table(title="Leaderboard: best trial per method, chosen on validation; test scored once at its kept "
                        "checkpoint", title_justify="left")
    calibrated = any(row.calibration_seconds for row in rows)
    pruned = any(k.startswith("pruning/") for row in rows for k in row.figures)
    biases = [name for name in HEADLINE_BIAS if any(f"{BIAS}{name}" in row.figures for row in rows)]
    columns = ["task", "method", "validation", "test", "trainable", "% of model", "peak memory", "train time",
               *(["calibration"] if calibrated else []), *(["pruned heads/neurons"] if pruned else []),
               *biases, "samples/s", "steps", "trials", "config"]
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        extra = [f"{row.calibration_seconds or 0:.1f}s"] if calibrated else []
        if pruned:
            heads, neurons = row.figures.get("pruning/heads"), row.figures.get("pruning/neurons")
            extra.append("-" if heads is None else f"{heads:.0%} / {neurons or 0:.0%}")
        for name in biases:
            value, base = row.figures.get(f"{BIAS}{name}"), row.figures.get(f"{BIAS_BASE}{name}")
            extra.append("-" if value is None else f"{value:.3g}" + ("" if base is None else f" ({base:.3g})"))
        table.add_row(
            row.task, row.method, f"{row.objective:.4f}",
            "-" if row.test_objective is None else f"{row.test_objective:.4f}", f"{row.trainable_params:,}",
            f"{row.trainable_pct:.3f}%", _mib(row.peak_memory_bytes),
            f"{row.train_seconds:.1f}s" if row.train_seconds is not None else "-", *extra,
            f"{row.samples_per_second:.1f}" if row.samples_per_second is not None else "-",
            steps_cell(row.steps, row.status), str(row.n_trials), _short(row.hparams),
        )
    return table


def steps_cell(steps: int | None, status: TrialStatus) -> str:
    """Steps trained, marked when early stopping ended the trial: `200 (stopped)`."""
    shown = "-" if steps is None else str(steps)
    return f"{shown} (stopped)" if status is TrialStatus.EARLY_STOPPED else shown


def _mib(value: int | None) -> str:
    return f"{value / 2**20:.0f} MiB" if value else "-"



def splits_table(summaries) -> Table:
    """Rows and class counts of each task's train, validation and test splits."""
    table = Table(title="Data: train for training, validation for the search, test reported once per trial",
                  title_justify="left")
    for column in ("task", "split", "rows", "classes", "examples per class"):
        table.add_column(column, overflow="fold")
    for s in summaries:
        if s.counts is None:
            table.add_row(s.task, s.split, f"{s.rows:,}", "-", "-")
            continue
        shown = ", ".join(f"{name} {n:,}" for name, n in list(s.counts.items())[:8])
        more = f", ... ({len(s.counts) - 8} more)" if len(s.counts) > 8 else ""
        table.add_row(s.task, s.split, f"{s.rows:,}", str(len(s.counts)), shown + more)
    return table


def budget_table(fits) -> Table:
    """How each method meets the parameter budget on each task."""
    table = Table(title=f"Parameter budget: {fits[0].budget:,} trainable parameters" if len({f.budget for f in fits}) == 1
                  else "Parameter budget per task", title_justify="left")
    for column in ("task", "method", "budget", "size", "trainable", "vs budget", "note"):
        table.add_column(column, overflow="fold")
    for fit in fits:
        size = ", ".join(f"{k}={v}" for k, v in fit.size.items()) or "-"
        style = "yellow" if fit.note else None
        table.add_row(fit.task, fit.method, f"{fit.budget:,}", size, f"{fit.expected:,}",
                      f"{fit.deviation:+.1%}", fit.note, style=style)
    return table


def seeds_table(summary) -> Table:
    """One row per (task, method): the seeds of its best configuration, mean, std and 95% CI."""
    from peftlab.dashboard.stats import ALPHA, TEST

    table = Table(title="Across seeds, on test: each method's best configuration (chosen on validation), "
                        f"95% bootstrap CI of the mean; verdict against the best: {TEST}, worse at p < {ALPHA}",
                  title_justify="left")
    columns = ["task", "method", "seeds", "validation mean", "test mean", "std", "95% CI", "verdict", "p (Holm)",
               "trainable"]
    if "budget" in summary:
        columns.append("vs budget")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in summary.itertuples():
        cells = [row.task, row.method, str(row.n_seeds), f"{row.validation_mean:.4f}", _number(row.mean),
                 "-" if math.isnan(row.std) else f"{row.std:.4f}", f"[{row.ci_lo:.4f}, {row.ci_hi:.4f}]",
                 row.verdict, "-" if math.isnan(row.p_holm) else f"{row.p_holm:.3g}", f"{row.trainable_params:,.0f}"]
        if "budget" in summary:
            cells.append(f"{row.trainable_params / row.budget - 1:+.1%}")
        table.add_row(*cells)
    return table


def _number(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.4f}"


def ranks_table(ranks) -> Table:
    """Average rank of each method over the tasks it ran on (1 = best), overall and per domain."""
    table = Table(title="Average rank across tasks (1 = best test mean on a task)", title_justify="left")
    for column in ranks.columns:
        table.add_column(column.replace("rank: ", "").replace("_", " "), overflow="fold")
    for row in ranks.itertuples(index=False):
        # A domain where a method never ran has no rank, not a rank of NaN.
        table.add_row(*[("-" if math.isnan(v) else f"{v:.2f}") if isinstance(v, float) else str(v) for v in row])
    return table
