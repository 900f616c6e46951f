"""Dashboard speed on a big store: 100,000 synthetic trials over 20 experiments and 5 million
metric points in SQLite.

Times each page's queries on a fresh read-only engine (goal < 1 s each) and each page's full
render through Streamlit's AppTest, cold (caches cleared) and warm (goal < 2 s).
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
from sqlalchemy import create_engine, insert, select

from peftlab.dashboard import queries
from peftlab.dashboard.queries import Filters
from peftlab.store import BIAS, BIAS_BASE, ResultsStore
from peftlab.store_models import Experiment, Trial, TrialMetric

APP = Path(__file__).resolve().parent.parent / "dashboard" / "app.py"
TASKS = [("sst2", "nlp/sentiment"), ("banking77", "nlp/intent"), ("fomc", "finance/monetary-policy"),
         ("cifar10", "vision/objects"), ("chest-xray", "medical/radiology"), ("crows-pairs", "bias/stereotypes")]
METHODS = {  # method -> (mean accuracy, trainable params, its hyperparameters' sampler)
    "full": (0.90, 22_700_000, lambda r: {"lr": float(10 ** r.uniform(-5, -4))}),
    "lora": (0.89, 300_000, lambda r: {"r": int(r.choice([4, 8, 16])), "alpha": 16,
                                       "lr": float(10 ** r.uniform(-4, -2.5)),
                                       "target_modules": ["query", "value"]}),
    "dora": (0.89, 320_000, lambda r: {"r": int(r.choice([4, 8])), "lr": float(10 ** r.uniform(-4, -2.5))}),
    "ia3": (0.86, 60_000, lambda r: {"lr": float(10 ** r.uniform(-3, -1.5))}),
    "bitfit": (0.85, 100_000, lambda r: {"lr": float(10 ** r.uniform(-3, -2))}),
    "prompt_tuning": (0.78, 15_000, lambda r: {"num_virtual_tokens": int(r.choice([10, 20])),
                                               "lr": float(10 ** r.uniform(-2, -1))}),
    "linear_probe": (0.80, 1_500, lambda r: {"lr": float(10 ** r.uniform(-3, -2))}),
}
SEEDS = 3
PAGES = [("overview.py", "Overview"), ("leaderboard.py", "Leaderboard"), ("domains.py", "Methods x domains"),
         ("pareto.py", "Pareto"), ("sensitivity.py", "Sensitivity"), ("trial.py", "Trial"), ("bias.py", "Bias")]
STATUSES = ["COMPLETED"] * 70 + ["EARLY_STOPPED"] * 20 + ["FAILED"] * 8 + ["RUNNING"] * 2


CURVE_STEPS = range(10, 301, 10)
CURVE_NAMES = ("validation/accuracy", "train/loss")
POINTS_PER_CURVE = len(CURVE_STEPS) * len(CURVE_NAMES)
BIAS_NAMES = tuple(f"{prefix}{name}" for name in ("crows_pairs", "winobias_gap") for prefix in (BIAS, BIAS_BASE))
"""Scores the trials with curves also carry, once, at their last step (as a trial writes them)."""


def fill(url: str, trials: int, experiments: int, curves: int, seed: int = 0) -> int:
    """Synthetic experiments through the store API, trials and curves as bulk inserts into
    the same tables (one transaction each), the way the recorder's rows look; returns the metric
    points inserted."""
    store = ResultsStore(url)
    for e in range(experiments):
        store.create_experiment(f"bench-{e:02d}", {"name": f"bench-{e:02d}"}, "hash", "validation/accuracy",
                                "max", "bench", {})
    store.close()
    rng = np.random.default_rng(seed)
    engine = create_engine(url)
    start = datetime(2025, 1, 1, tzinfo=timezone.utc)
    rows, inserted = [], 0
    per_experiment = trials // experiments
    with engine.begin() as connection:
        ids = dict(connection.execute(select(Experiment.name, Experiment.id)).all())
        for e in range(experiments):
            tasks = [TASKS[(e + k) % len(TASKS)] for k in range(3)]
            model = ["minilm", "vit-tiny", "resnet18", "tiny-llama"][e % 4]
            n = config = 0
            while n < per_experiment:  # one configuration (method, task, hyperparameters) per pass
                task, domain = tasks[config % 3]
                method = list(METHODS)[(config // 3) % len(METHODS)]
                config += 1
                mean, trainable, sample = METHODS[method]
                hparams = sample(rng)
                quality = mean - 0.02 * abs(np.log10(hparams["lr"]) + 3)
                for s in range(min(SEEDS, per_experiment - n)):
                    status = STATUSES[int(rng.integers(len(STATUSES)))]
                    failed = status == "FAILED"
                    objective = None if failed else float(np.clip(quality + rng.normal(0, 0.01), 0, 1))
                    begun = start + timedelta(minutes=len(rows))
                    rows.append(dict(
                        trial_id=f"b{e:02d}-{n:06d}", experiment_id=ids[f"bench-{e:02d}"], task=task,
                        domain=domain, dataset=task, model=model, method=method, seed=s,
                        hparams=hparams, status=status,
                        error="NonFiniteLoss: training loss became nan at step 40" if failed else None,
                        trainable_params=trainable, total_params=22_700_000,
                        trainable_pct=100 * trainable / 22_700_000, adapter_bytes=4 * trainable,
                        peak_memory_bytes=int((900 + trainable / 30_000 + rng.normal(0, 20)) * 2**20),
                        train_seconds=float(60 + trainable / 200_000 + rng.normal(0, 3)),
                        samples_per_second=float(40 + rng.normal(0, 2)), steps=300, objective=objective,
                        final_metrics={"validation/accuracy": objective}, best_metrics={"validation/accuracy": objective},
                        mlflow_run_id=f"run{len(rows)}", node="node-1", started_at=begun,
                        finished_at=None if status == "RUNNING" else begun + timedelta(minutes=9),
                    ))
                    n += 1
        for chunk in range(0, len(rows), 10_000):
            connection.execute(insert(Trial), rows[chunk:chunk + 10_000])
        # Curves for the first `curves` trials (each experiment's earliest), built a chunk at a time.
        for chunk in range(0, min(curves, len(rows)), 500):
            points = [dict(experiment_id=row["experiment_id"], trial_id=row["trial_id"], step=step, name=name,
                           value=float(value))
                      for row in rows[chunk:min(chunk + 500, curves)]
                      for step, name, value in zip(
                          (s for s in CURVE_STEPS for _ in CURVE_NAMES), CURVE_NAMES * len(CURVE_STEPS),
                          rng.uniform(0.3, 0.9, POINTS_PER_CURVE))]
            points += [dict(experiment_id=row["experiment_id"], trial_id=row["trial_id"], step=CURVE_STEPS[-1],
                            name=name, value=float(value))
                       for row in rows[chunk:min(chunk + 500, curves)] if row["status"] != "FAILED"
                       for name, value in zip(BIAS_NAMES, rng.uniform(40, 70, len(BIAS_NAMES)))]
            connection.execute(insert(TrialMetric), points)
            inserted += len(points)
    engine.dispose()
    return inserted


def page_queries(connection, filters: Filters) -> dict[str, dict[str, Callable]]:
    """Each page's queries, as the page issues them (its default selections)."""
    boards = queries.boards(connection, filters)
    first = tuple(boards.iloc[0][list(queries.BOARD)]) if not boards.empty else None
    method = queries.methods_on(connection, filters, first)[0] if first else "lora"
    some_trial = "b00-000000"  # fill() gives the first trials their curves
    return {
        "Overview": {"filter_options": lambda: queries.filter_options(connection),
                     "overview": lambda: queries.overview(connection, filters)},
        "Leaderboard": {"leaderboard_seeds": lambda: queries.leaderboard_seeds(connection, filters)},
        "Methods x domains": {"leaderboard_seeds": lambda: queries.leaderboard_seeds(connection, filters)},
        "Pareto": {"boards": lambda: queries.boards(connection, filters),
                   "pareto_points (one task)": lambda: queries.pareto_points(connection, filters, first)},
        "Sensitivity": {"methods_on": lambda: queries.methods_on(connection, filters, first),
                        "sensitivity_trials": lambda: queries.sensitivity_trials(connection, filters, first, method)},
        "Trial": {"trial_choices": lambda: queries.trial_choices(connection, filters, 1_000),
                  "trial": lambda: queries.trial(connection, "bench-00", some_trial),
                  "curves": lambda: queries.curves(connection, "bench-00", some_trial)},
        "Bias": {"bias_scores": lambda: queries.bias_scores(connection, filters)},
    }


def time_queries(url: str, filters: Filters, repeats: int) -> list[tuple[str, str, int, float]]:
    engine = queries.open_engine(url)
    results = []
    with engine.connect() as connection:
        for page, calls in page_queries(connection, filters).items():
            for name, call in calls.items():
                times = []
                for _ in range(repeats):
                    began = time.perf_counter()
                    out = call()
                    times.append(time.perf_counter() - began)
                if isinstance(out, dict):  # filter options: count the values; one trial: 1
                    rows = sum(len(v) for v in out.values()) if name == "filter_options" else 1
                else:
                    rows = len(out[0] if isinstance(out, tuple) else out)
                results.append((page, name, rows, statistics.median(times)))
    engine.dispose()
    return results


def time_pages(url: str) -> list[tuple[str, float, float]]:
    """Cold (caches cleared, queries run) and warm (cached) render of each page via AppTest."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    os.environ["PEFTLAB_STORE_URL"] = url
    # Driving Streamlit outside a server warns "missing ScriptRunContext" / "no runtime" at
    # each page switch and cache clear; page errors still surface through `at.exception`.
    logging.disable(logging.WARNING)
    AppTest.from_file(str(APP), default_timeout=120).run()  # imports Plotly, pandas: not a page's cost
    results = []
    for file, title in PAGES:
        at = AppTest.from_file(str(APP), default_timeout=120).run()
        if file != "overview.py":
            at.switch_page(file)
        st.cache_data.clear()
        began = time.perf_counter()
        at.run()
        cold = time.perf_counter() - began
        began = time.perf_counter()
        at.run()
        warm = time.perf_counter() - began
        if at.exception:
            raise SystemExit(f"{title} raised: {at.exception[0].value}")
        results.append((title, cold, warm))
    logging.disable(logging.NOTSET)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100_000)
    parser.add_argument("--experiments", type=int, default=20)
    parser.add_argument("--points", type=int, default=5_000_000,
                        help=f"curve points in all, {POINTS_PER_CURVE} per trial that has curves "
                             f"(which also gets {len(BIAS_NAMES)} bias scores unless it failed)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per query (median shown)")
    parser.add_argument("--store", help="reuse this SQLite file if it exists, else fill it")
    parser.add_argument("--smoke", action="store_true", help="2,000 trials over 4 experiments, once: seconds")
    args = parser.parse_args()
    if args.smoke:
        args.trials, args.experiments, args.points, args.repeats = 2_000, 4, 200 * POINTS_PER_CURVE, 1
    args.curves = args.points // POINTS_PER_CURVE
    with tempfile.TemporaryDirectory(prefix="peftlab-dash-bench-") as workdir:
        path = Path(args.store) if args.store else Path(workdir) / "results.db"
        run(f"sqlite:///{path}", path, args)


def run(url: str, path: Path, args: argparse.Namespace) -> None:
    if not path.exists():
        began = time.perf_counter()
        points = fill(url, args.trials, args.experiments, args.curves)
        print(f"filled a SQLite store with {args.trials:,} trials over {args.experiments} experiments "
              f"and {points:,} metric points ({args.curves:,} trials with curves) in {time.perf_counter() - began:.1f} s; "
              f"{path.stat().st_size / 2**20:.0f} MiB")

    one = Filters(experiment=("bench-00",))
    print(f"\nqueries on a fresh read-only engine, median of {args.repeats} (goal < 1 s each)")
    print(f"{'page':<20}{'query':<28}{'all: rows':>10}{'s':>8}{'1 exp: rows':>13}{'s':>8}")
    for (page, name, rows, seconds), (_, _, rows1, seconds1) in zip(
            time_queries(url, Filters(), args.repeats), time_queries(url, one, args.repeats), strict=True):
        print(f"{page:<20}{name:<28}{rows:>10,}{seconds:>8.3f}{rows1:>13,}{seconds1:>8.3f}")

    print("\npage render through AppTest, no filters (goal < 2 s)")
    print(f"{'page':<20}{'cold s':>8}{'warm s':>8}")
    for title, cold, warm in time_pages(url):
        print(f"{title:<20}{cold:>8.2f}{warm:>8.2f}")
    print("cold: caches cleared, every query of the page runs; warm: the page's results cached")

if __name__ == "__main__":
    main()
