"""The dashboard through Streamlit's AppTest, on a fixture store written by the real store API.

Expected numbers are computed here from the fixture's own lists, not through the dashboard's
SQL: best configuration per method, mean and CI over seeds, verdicts from paired tests, ranks, normalized
scores, Pareto membership. Also: the views on PostgreSQL, the read-only connection, the
`peftlab dashboard` command's refusals, and that the dashboard imports neither Ray nor workers.
"""
from __future__ import annotations

import ast
import base64
import json
import re
import subprocess
import sys
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest, ttest_rel
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from streamlit.testing.v1 import AppTest
from typer.testing import CliRunner

from peftlab.cli import app as cli
from peftlab.dashboard import queries, stats
from peftlab.dashboard.pareto import ALL_TASKS
from peftlab.dashboard.queries import Filters
from peftlab.store import ResultsStore, TrialRecord, TrialStatus

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "dashboard" / "app.py"
PAGES = {"overview.py": "Overview", "leaderboard.py": "Leaderboard", "domains.py": "Methods x domains",
         "pareto.py": "Pareto", "sensitivity.py": "Sensitivity", "bias.py": "Bias", "trial.py": "Trial"}
MIB = 2**20
TOTAL_PARAMS = 22_700_000
C, E, F, R = (TrialStatus.COMPLETED, TrialStatus.EARLY_STOPPED, TrialStatus.FAILED,
              TrialStatus.RUNNING)
RANKED = {"COMPLETED", "EARLY_STOPPED"}

EXPERIMENTS = {  # name -> (metric, mode, model)
    "cross": ("validation/accuracy", "max", "minilm"),
    "loss-min": ("validation/loss", "min", "tiny-bert"),
    "all-failed": ("validation/accuracy", "max", "minilm"),
    "no-trials": ("validation/accuracy", "max", "minilm"),
}
TRAINABLE = {"lora": 300_000, "bitfit": 100_000, "full": TOTAL_PARAMS, "ia3": 50_000}
# (experiment, task, domain, method, hparams, [(seed, status, objective)])
GROUPS = [
    ("cross", "sst2", "nlp/sentiment", "lora", {"r": 8, "lr": 1e-3}, [(0, C, .90), (1, C, .92), (2, C, .91)]),
    ("cross", "sst2", "nlp/sentiment", "lora", {"r": 16, "lr": 3e-4}, [(0, C, .88), (1, C, .89), (2, E, .87)]),
    ("cross", "sst2", "nlp/sentiment", "bitfit", {"lr": 1e-3}, [(0, C, .86), (1, C, .87), (2, E, .85)]),
    ("cross", "sst2", "nlp/sentiment", "full", {"lr": 2e-5}, [(0, C, .905), (1, C, .925), (2, C, .93)]),
    ("cross", "sst2", "nlp/sentiment", "lora", {"r": 4, "lr": 1e-2}, [(0, F, None)]),
    ("cross", "sst2", "nlp/sentiment", "bitfit", {"lr": 5e-3}, [(0, R, 0.5)]),
    ("cross", "fomc", "finance/monetary-policy", "lora", {"r": 8, "lr": 1e-3}, [(0, C, .60), (1, C, .62)]),
    ("cross", "fomc", "finance/monetary-policy", "bitfit", {"lr": 1e-3}, [(0, C, .55), (1, E, .58)]),
    ("cross", "fomc", "finance/monetary-policy", "full", {"lr": 2e-5}, [(0, C, .61), (1, C, .66)]),
    ("loss-min", "banking77", "nlp/intent", "lora", {"r": 8, "lr": 1e-3}, [(0, C, .50), (1, C, .52)]),
    ("loss-min", "banking77", "nlp/intent", "ia3", {"lr": 3e-3}, [(0, C, .45), (1, C, .47)]),
    ("all-failed", "sst2", "nlp/sentiment", "lora", {"r": 8, "lr": 1e-3}, [(0, F, None), (1, F, None), (2, F, None)]),
]
CURVED = "cross-sst2-full-0-s2"  # the trial with metric curves (and the known trial of the Trial page)
CURVE = {50: {"validation/accuracy": 0.80, "validation/loss": 0.50, "train/loss": 0.60},
         100: {"validation/accuracy": 0.90, "validation/loss": 0.30, "train/loss": float("nan")},
         150: {"validation/accuracy": 0.93, "validation/loss": 0.25, "train/loss": 0.20}}


# Bias scores: cross / sst2's trials that trained (the curved one aside: a trial run without
# bias_eval) carry them, at their last step, in their curves and their final_metrics.
BIAS_BASE = {  # name -> the untouched model's score for a seed (winobias_gap's differs by seed)
    "crows_pairs": lambda seed: 60.0, "crows_pairs_gender": lambda seed: 55.0,
    "winobias_gap": lambda seed: 0.30 + 0.01 * seed, "bbq_bias_ambiguous": lambda seed: 0.12,
    "bbq_accuracy_ambiguous": lambda seed: 0.70,
}
BIAS_SCALE = {"crows_pairs": 1.0, "crows_pairs_gender": 2.0, "winobias_gap": 0.01,
              "bbq_bias_ambiguous": 0.01, "bbq_accuracy_ambiguous": 0.005}
BIAS_SHIFT = {"lora": -2.0, "bitfit": 1.0, "full": -4.0}


def has_bias(record: TrialRecord) -> bool:
    return (record.experiment, record.task) == ("cross", "sst2") and record.steps is not None and record.trial_id != CURVED


def fixture_bias(method: str, seed: int, config: int) -> dict[str, float]:
    """A trial's bias/ and bias_base/ scores: the base's, moved by its method, seed and configuration."""
    shift = BIAS_SHIFT[method] + 0.5 * seed + 0.25 * config
    scores = {}
    for name, base in BIAS_BASE.items():
        scores[f"bias/{name}"] = round(base(seed) + shift * BIAS_SCALE[name], 6)
        scores[f"bias_base/{name}"] = round(base(seed), 6)
    return scores


def fixture_test_score(objective: float | None, seed: int) -> float | None:
    """The fixture's test score: below validation by a seed-dependent amount that every method
    shares, so the paired verdicts are those of the validation scores while every mean moves."""
    return None if objective is None else round(objective - 0.03 + 0.005 * seed, 6)


def fixture_trials() -> list[TrialRecord]:
    base = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
    trials, index = [], defaultdict(int)
    for experiment, task, domain, method, hparams, seeds in GROUPS:
        config = index[(experiment, task, method)]
        index[(experiment, task, method)] += 1
        for seed, status, objective in seeds:
            n = len(trials)
            trainable = TRAINABLE[method]
            started = base + timedelta(minutes=10 * n)
            failed = status is F
            trials.append(TrialRecord(
                trial_id=f"{experiment}-{task}-{method}-{config}-s{seed}", experiment=experiment,
                task=task, domain=domain, dataset=task, model=EXPERIMENTS[experiment][2],
                method=method, seed=seed, hparams=hparams, status=status, objective=objective,
                test_objective=fixture_test_score(objective, seed),
                error=("OutOfMemoryError: CUDA out of memory" if experiment == "all-failed"
                       else "NonFiniteLoss: training loss became nan at step 2") if failed else None,
                trainable_params=trainable, total_params=TOTAL_PARAMS,
                trainable_pct=100.0 * trainable / TOTAL_PARAMS,
                adapter_bytes=None if failed else 4 * trainable + 1000 * seed,
                peak_memory_bytes=(800 + 7 * n + 50 * len(hparams)) * MIB,
                train_seconds=None if failed else 60.0 + trainable / 1e5 + 3 * seed + config,
                samples_per_second=None if failed else 40.0 - seed - config,
                steps=None if failed else 150, final_metrics={}, best_metrics={},
                mlflow_run_id=f"run{n:04d}", node="node-1", started_at=started,
                finished_at=None if status is R else started + timedelta(minutes=9),
            ))
            if has_bias(trials[-1]):
                record = trials[-1]
                record.final_metrics = {"validation/accuracy": objective, "test/accuracy": record.test_objective,
                                        **fixture_bias(method, seed, config), "step": record.steps}
    return trials


def write_fixture_store(url: str) -> list[TrialRecord]:
    """The fixture, written through ResultsStore exactly as the recorder writes a sweep."""
    store = ResultsStore(url)
    for name, (metric, mode, _model) in EXPERIMENTS.items():
        store.create_experiment(name, {"name": name}, f"hash-{name}", metric, mode, "abc123",
                                {"torch": "2.13.0"})
    trials = fixture_trials()
    for record in trials:
        store.upsert_trial(record)
    for step, metrics in CURVE.items():
        store.add_metrics("cross", CURVED, step, metrics)
    for record in trials:  # as the recorder writes a final report's figures: at the trial's last step
        if has_bias(record):
            store.add_metrics(record.experiment, record.trial_id, record.steps,
                              {k: v for k, v in record.final_metrics.items() if k.startswith("bias")})
    store.close()
    return trials


# -- expected values, straight from the fixture --------------------------------------------------

def expected_summary(trials, statuses=RANKED, methods=None) -> pd.DataFrame:
    """Per (experiment, task, method): the best configuration (most seeds, then mean), its stats."""
    groups: dict = defaultdict(lambda: defaultdict(list))
    for t in trials:
        if t.status.value in statuses and t.objective is not None and (methods is None or t.method in methods):
            groups[(t.experiment, t.task, t.method)][json.dumps(t.hparams)].append(t)
    rows = []
    for (experiment, task, method), configs in groups.items():
        # A configuration with a completed run counts only its completed runs.
        for c, runs in configs.items():
            if any(t.status is C for t in runs):
                configs[c] = [t for t in runs if t.status is C]
        sign = 1 if EXPERIMENTS[experiment][1] == "max" else -1
        # The configuration with the most seeds wins, then the best mean.
        # The configuration is chosen on validation; what is reported is its test scores.
        best = max(configs, key=lambda c: (len(configs[c]), sign * np.mean([t.objective for t in configs[c]])))
        chosen = configs[best]
        values = [t.test_objective for t in chosen]
        lo, hi = stats.bootstrap_ci(values)
        rows.append(dict(
            experiment=experiment, task=task, method=method, mean=np.mean(values), ci_lo=lo, ci_hi=hi,
            validation_mean=np.mean([t.objective for t in chosen]),
            score=sign * np.mean(values), n_seeds=len(values), n_configs=len(configs),
            n_trials=sum(len(v) for v in configs.values()), hparams=best,
            trainable_params=chosen[0].trainable_params, trainable_pct=chosen[0].trainable_pct,
            adapter_mib=np.mean([t.adapter_bytes for t in chosen]) / MIB,
            peak_memory_mib=np.mean([t.peak_memory_bytes for t in chosen]) / MIB,
            train_seconds=np.mean([t.train_seconds for t in chosen]),
            samples_per_second=np.mean([t.samples_per_second for t in chosen]),
            best_trial=max(chosen, key=lambda t: sign * t.objective).trial_id,
            by_seed={t.seed: sign * t.test_objective for t in chosen},
        ))
    frame = pd.DataFrame(rows)
    frame["verdict"], frame["n_paired"], frame["p_holm"] = "untested", 0, np.nan
    ranks = []
    for _, row in frame.iterrows():
        board = frame[(frame.experiment == row.experiment) & (frame.task == row.task)]
        ranks.append(1 + (board["score"] > row.score).sum())  # no equal means in the fixture
    # Verdicts: the best mean against each other method, paired t-test on shared seeds, Holm.
    for _, board in frame.groupby(["experiment", "task"]):
        best = board.loc[board["score"].idxmax()]
        frame.loc[best.name, ["verdict", "n_paired"]] = ["best", len(best.by_seed)]
        raw = {}
        for index, row in board.drop(best.name).iterrows():
            shared = sorted(set(best.by_seed) & set(row.by_seed))
            frame.loc[index, "n_paired"] = len(shared)
            if len(shared) >= 2:
                a, b = [best.by_seed[s] for s in shared], [row.by_seed[s] for s in shared]
                gaps = np.subtract(a, b)
                # Differences without spread have no t statistic: the exact sign test instead.
                flat = np.ptp(gaps) <= 1e-9 * max(1.0, np.abs(gaps).max())
                sign = 1.0 if np.allclose(gaps, 0) else binomtest(len(gaps), len(gaps), 0.5).pvalue
                raw[index] = sign if flat else ttest_rel(a, b).pvalue
        previous = 0.0
        for position, index in enumerate(sorted(raw, key=raw.get)):
            previous = max(previous, min(1.0, (len(raw) - position) * raw[index]))
            frame.loc[index, ["p_holm", "verdict"]] = [previous, "worse" if previous < 0.05 else "tied"]
    return frame.drop(columns="by_seed").assign(rank=np.array(ranks, dtype=float))


def brute_force_front(cost: list[float], score: list[float]) -> list[bool]:
    points = list(zip(cost, score, strict=True))
    return [not any(q[0] <= p[0] and q[1] >= p[1] and q != p for q in points) for p in points]


# -- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fixture_store(tmp_path_factory) -> tuple[str, list[TrialRecord]]:
    url = f"sqlite:///{tmp_path_factory.mktemp('dash') / 'results.db'}"
    return url, write_fixture_store(url)


@pytest.fixture
def store_env(fixture_store, monkeypatch) -> list[TrialRecord]:
    monkeypatch.setenv("PEFTLAB_STORE_URL", fixture_store[0])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return fixture_store[1]


def page(name: str, *, query: dict | None = None, filters: dict | None = None) -> AppTest:
    """Run the app on one page (after the first run registers the navigation), filters set."""
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.query_params.update(query or {})
    at.run()
    if name != "overview.py":
        at.switch_page(name).run()
    for key, values in (filters or {}).items():
        at.multiselect(key=f"filter_{key}").set_value(values)
    if filters:
        at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.title[0].value == PAGES[name]
    return at


def table(at: AppTest, index: int = 0) -> pd.DataFrame:
    return at.dataframe[index].value


def decoded(value):
    """Plotly 6 sends numeric arrays as {dtype, bdata[, shape]}: turn them back into lists."""
    if isinstance(value, dict) and "bdata" in value and "dtype" in value:
        array = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
        if "shape" in value:
            array = array.reshape([int(n) for n in str(value["shape"]).split(",")])
        return array.tolist()
    if isinstance(value, dict):
        return {key: decoded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [decoded(item) for item in value]
    return value


def figures(at: AppTest) -> list[dict]:
    """The page's Plotly figures as plain data."""
    return [decoded(json.loads(chart.proto.spec)) for chart in at.get("plotly_chart")]


def assert_every_table_downloads(at: AppTest) -> None:
    assert len(at.get("download_button")) == len(at.dataframe) > 0


# -- pages -----------------------------------------------------------------------------------------

def test_overview_counts_match_the_fixture_and_follow_filters(store_env) -> None:
    trials = store_env
    at = page("overview.py")
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Experiments"] == str(len(EXPERIMENTS)) and metrics["Trials"] == str(len(trials))
    assert metrics["Failed"] == str(sum(t.status is F for t in trials))
    shown = table(at).set_index("experiment")
    for name in EXPERIMENTS:
        mine = [t for t in trials if t.experiment == name]
        assert shown.loc[name, "trials"] == len(mine)
        for status in TrialStatus:
            assert shown.loc[name, status.value.lower()] == sum(t.status is status for t in mine)
    assert shown.loc["cross", "tasks"] == 2 and set(shown.loc["cross", "domains"].split(", ")) == {
        "nlp/sentiment", "finance/monetary-policy"}
    assert shown.loc["loss-min", "models"] == "tiny-bert"
    assert shown.loc["no-trials", "trials"] == 0
    assert_every_table_downloads(at)

    at = page("overview.py", filters={"method": ["bitfit"]})
    shown = table(at).set_index("experiment")
    assert list(shown.index) == ["cross"]
    assert shown.loc["cross", "trials"] == sum(t.method == "bitfit" for t in trials)


LEADERBOARD_COLUMNS = ["validation_mean", "mean", "ci_lo", "ci_hi", "n_seeds", "n_configs", "n_trials", "verdict", "n_paired",
                       "p_holm", "rank",
                       "trainable_params", "trainable_pct", "adapter_mib", "peak_memory_mib",
                       "train_seconds", "samples_per_second", "hparams", "best_trial"]


def assert_leaderboard(shown: pd.DataFrame, expected: pd.DataFrame) -> None:
    keys = ["experiment", "task", "method"]
    shown, expected = shown.set_index(keys).sort_index(), expected.set_index(keys).sort_index()
    assert list(shown.index) == list(expected.index)
    for column in LEADERBOARD_COLUMNS:
        if not pd.api.types.is_numeric_dtype(expected[column]):
            assert list(shown[column]) == list(expected[column]), column
        else:
            np.testing.assert_allclose(shown[column].astype(float), expected[column].astype(float),
                                       rtol=1e-12, err_msg=column)


def test_leaderboard_numbers_equal_the_fixture(store_env) -> None:
    at = page("leaderboard.py")
    expected = expected_summary(store_env)
    assert_leaderboard(table(at), expected)
    board = expected[(expected.experiment == "cross") & (expected.task == "fomc")]
    # full beats lora on both shared seeds (by 0.01 and 0.04: p = 0.34); bitfit shares one seed.
    assert dict(zip(board.method, board.verdict, strict=True)) == {"full": "best", "lora": "tied",
                                                                   "bitfit": "untested"}
    best = board[board.verdict == "best"].iloc[0]
    summary_line = at.markdown[0].value
    assert f"Best on fomc: {best.method}" in summary_line and f"{best['mean']:.4f}" in summary_line
    assert "paired t-test over seeds, Holm-corrected across methods (2 paired seeds)" in summary_line
    assert "tied with it: lora; worse: none; untested (fewer than two shared seeds): bitfit." in summary_line
    # The chart shows the same means and intervals, best first.
    points = {name: y for trace in figures(at)[0]["data"] for name, y in zip(trace["x"], trace["y"], strict=True)}
    assert points == pytest.approx(dict(zip(board.method, board["mean"], strict=True)))
    assert_every_table_downloads(at)
    # The other boards: a min-mode experiment (lower loss wins) and sst2's three-way contest.
    loss = expected[expected.experiment == "loss-min"].set_index("method")
    # Lower loss is better; lora's loss is 0.05 above ia3's on both seeds: a constant gap, and two
    # seeds cannot separate them (sign test, p = 0.5).
    assert loss.loc["ia3", "verdict"] == "best" and loss.loc["lora", "verdict"] == "tied"
    assert loss.loc["lora", "p_holm"] == 0.5
    sst2 = expected[(expected.experiment == "cross") & (expected.task == "sst2")].set_index("method")
    assert sst2.loc["lora", "hparams"] == json.dumps({"r": 8, "lr": 1e-3})
    assert list(sst2.sort_values("rank").index) == ["full", "lora", "bitfit"]


def test_smoke_experiments_stay_out_of_comparisons_unless_asked(tmp_path, monkeypatch) -> None:
    from dataclasses import replace

    url = f"sqlite:///{tmp_path / 'results.db'}"
    store, template = ResultsStore(url), fixture_trials()[0]
    # The smoke run's numbers (a few steps) would reverse the study's order if they were counted.
    for name, scores in (("study", {"lora": 0.90, "bitfit": 0.80}), ("study-smoke", {"lora": 0.20, "bitfit": 0.99})):
        store.create_experiment(name, {"name": name}, f"hash-{name}", "validation/accuracy", "max", "abc123", {})
        for method, objective in scores.items():
            store.upsert_trial(replace(template, experiment=name, trial_id=f"{name}-{method}", method=method,
                                       objective=objective, test_objective=objective, hparams={"lr": 1e-3}))
    store.close()
    monkeypatch.setenv("PEFTLAB_STORE_URL", url)

    at = page("leaderboard.py")
    assert set(table(at)["experiment"]) == {"study"}
    assert at.markdown[0].value.startswith("**Best on sst2: lora**")
    at.checkbox(key="filter_smoke").check().run()
    assert set(table(at)["experiment"]) == {"study", "study-smoke"}
    # Chosen by name, a smoke experiment is shown without the box.
    at = page("leaderboard.py", filters={"experiment": ["study-smoke"]})
    assert set(table(at)["experiment"]) == {"study-smoke"}
    assert list(table(page("overview.py"))["experiment"]) == ["study"]
    ranks = table(page("domains.py")).set_index("method")["average_rank"]
    assert ranks.to_dict() == {"lora": 1.0, "bitfit": 2.0}  # the study's order, not the smoke run's


def test_a_store_from_before_test_splits_shows_test_as_missing(tmp_path, monkeypatch) -> None:
    from dataclasses import replace

    url = f"sqlite:///{tmp_path / 'results.db'}"
    store = ResultsStore(url)
    store.create_experiment("old", {"name": "old"}, "hash-old", "validation/accuracy", "max", "abc123", {})
    for i, record in enumerate(t for t in fixture_trials() if t.experiment == "cross" and t.objective is not None):
        store.upsert_trial(replace(record, experiment="old", trial_id=f"old-{i}", test_objective=None))
    store.close()
    monkeypatch.setenv("PEFTLAB_STORE_URL", url)
    at = page("leaderboard.py")
    shown = table(at)
    assert shown["mean"].isna().all() and shown["validation_mean"].notna().all()  # missing, not zero
    assert "test accuracy **-**" in at.markdown[0].value
    domains = page("domains.py")
    assert not domains.exception and table(domains, 1)["normalized"].isna().all()


def test_leaderboard_filters_change_what_is_shown(store_env) -> None:
    at = page("leaderboard.py", filters={"method": ["lora", "bitfit"]})
    assert_leaderboard(table(at), expected_summary(store_env, methods={"lora", "bitfit"}))
    at.selectbox(key="leaderboard_board").set_value("sst2  ·  cross  ·  minilm").run()
    assert "Best on sst2: lora" in at.markdown[0].value

    at = page("leaderboard.py", filters={"status": ["COMPLETED"]})
    shown = table(at).set_index(["experiment", "task", "method"])
    assert shown.loc[("cross", "sst2", "bitfit"), "n_seeds"] == 2  # its early-stopped seed is out
    assert_leaderboard(table(at), expected_summary(store_env, statuses={"COMPLETED"}))


def test_methods_by_domains_heat_map_and_ranks(store_env) -> None:
    at = page("domains.py")
    expected = expected_summary(store_env)
    domain = {"sst2": "nlp/sentiment", "fomc": "finance/monetary-policy", "banking77": "nlp/intent"}
    expected["domain"] = expected.task.map(domain)
    expected["normalized"] = expected.score - expected.groupby(["experiment", "task"]).score.transform("max")
    cells = table(at, 1).set_index(["method", "domain"])
    for (method, dom), rows in expected.groupby(["method", "domain"]):
        assert cells.loc[(method, dom), "normalized"] == pytest.approx(rows.normalized.mean())
        assert cells.loc[(method, dom), "tasks"] == len(rows)
    ranks = table(at, 0).set_index("method")
    for method, rows in expected.groupby("method"):
        assert ranks.loc[method, "average_rank"] == pytest.approx(rows["rank"].mean())
        assert ranks.loc[method, "tasks"] == len(rows)
    assert list(ranks.index[:2]) == ["full", "ia3"]  # both 1.0; full over more tasks
    assert ranks.loc["lora", "average_rank"] == 2.0
    heat = figures(at)[0]["data"][0]
    z = pd.DataFrame(heat["z"], index=heat["y"], columns=heat["x"])
    # bitfit on sst2: its early-stopped seed is out, since that configuration also completed; on
    # test its seeds 0 and 1 average 0.8375, full's three 0.895.
    assert z.loc["lora", "nlp/intent"] == pytest.approx(-0.05) and z.loc["bitfit", "nlp/sentiment"] == pytest.approx(-0.0575)
    assert "Best average rank: **full**, **1.00** over 2 task(s)" in at.markdown[0].value
    assert_every_table_downloads(at)


def test_pareto_front_matches_brute_force(store_env) -> None:
    at = page("pareto.py")  # default: the first task, cross / fomc, against trainable params
    fomc = [t for t in store_env if t.experiment == "cross" and t.task == "fomc" and t.status.value in RANKED]
    on_front = brute_force_front([t.trainable_params for t in fomc], [t.objective for t in fomc])
    expected = sorted(t.trial_id for t, keep in zip(fomc, on_front, strict=True) if keep)
    assert sorted(table(at)["trial_id"]) == expected
    assert f"**{len(expected)}** of {len(fomc)} trials" in at.markdown[0].value
    traces = figures(at)[0]["data"]
    front = next(t for t in traces if t["name"] == "Pareto front")
    assert len(front["x"]) == len(expected) and figures(at)[0]["layout"]["xaxis"]["type"] == "log"
    assert_every_table_downloads(at)

    at.radio(key="pareto_cost").set_value("peak_memory_bytes").run()
    on_front = brute_force_front([t.peak_memory_bytes for t in fomc], [t.objective for t in fomc])
    assert sorted(table(at)["trial_id"]) == sorted(t.trial_id for t, k in zip(fomc, on_front, strict=True) if k)

    # Across tasks: each method's best configuration per task (the leaderboard's rows) on the
    # gap to the task's best method, costs averaged over the configuration's seeds.
    at.selectbox(key="pareto_board").set_value(ALL_TASKS).run()
    summary = expected_summary(store_env)
    gaps = summary.score - summary.groupby(["experiment", "task"]).score.transform("max")
    on_front = brute_force_front(list(summary.peak_memory_mib), list(gaps))
    shown = table(at)
    assert sorted(shown["trial_id"]) == sorted(summary.best_trial[on_front])
    assert shown.set_index("trial_id")["gap"].to_dict() == pytest.approx(
        dict(zip(summary.best_trial[on_front], gaps[on_front], strict=True)))


def test_method_colours_stay_distinct_beyond_ten_methods() -> None:
    from peftlab.dashboard import charts

    for n in (3, 12, 30):
        names = [f"method{i:02d}" for i in range(n)]
        colours = charts.method_colors(names)
        assert len(set(colours.values())) == n, n
        assert charts.method_colors(list(reversed(names)) * 2) == colours  # order and repeats do not matter
    points = pd.DataFrame({"method": [f"method{i:02d}" for i in range(12)], "trainable_params": range(1, 13),
                           "objective": np.linspace(0.5, 0.9, 12), "on_front": [True] * 12, "task": "t",
                           "trial_id": [f"t{i}" for i in range(12)], "hparams": "{}", "n_seeds": 1})
    figure = charts.pareto(points, "trainable_params", "objective", "accuracy")
    markers = {trace.name: trace.marker.color for trace in figure.data if trace.mode == "markers"}
    assert len(markers) == 12 and len(set(markers.values())) == 12
    # Filtered down to three methods, each keeps the colour it had among all twelve.
    few = charts.pareto(points.head(3), "trainable_params", "objective", "accuracy", methods=points["method"])
    assert {t.name: t.marker.color for t in few.data if t.mode == "markers"} == {
        name: markers[name] for name in points["method"].head(3)}


def test_sensitivity_shows_hyperparameters_and_early_stopping(store_env) -> None:
    at = page("sensitivity.py", filters={"experiment": ["cross"], "task": ["sst2"]})
    # The most searched method (most configurations) is listed first.
    assert at.selectbox(key="sensitivity_method").options[0] == "lora"
    at.selectbox(key="sensitivity_method").set_value("lora").run()
    lora = [t for t in store_env if t.experiment == "cross" and t.task == "sst2" and t.method == "lora"
            and t.status.value in RANKED]
    stopped = sum(t.status is E for t in lora)
    line = at.markdown[0].value
    assert f"**{len(lora)}** finished trial(s), {stopped} early-stopped" in line
    assert f"**{max(t.objective for t in lora):.4f}**" in line
    charts = figures(at)
    assert charts[0]["data"][0]["type"] == "parcoords"
    labels = [d["label"] for d in charts[0]["data"][0]["dimensions"]]
    assert labels == ["r", "log10(lr)", "status", "validation/accuracy"]
    margin = charts[0]["layout"]["margin"]  # room above for the axis names, beside for the outer ticks
    assert margin["t"] >= 100 and margin["l"] >= 60 and margin["r"] >= 60
    by_title = {c["layout"]["title"]["text"]: c for c in charts[1:]}
    lr = by_title["validation/accuracy vs lr (log axis)"]
    assert lr["layout"]["xaxis"]["type"] == "log"
    assert {trace["name"] for trace in lr["data"]} == {"completed", "early-stopped"}
    assert sorted(table(at)["trial_id"]) == sorted(t.trial_id for t in lora)
    assert_every_table_downloads(at)

    # A method with one configuration says so instead of drawing empty axes.
    at.selectbox(key="sensitivity_method").set_value("full").run()
    assert "same hyperparameters" in at.info[0].value


def test_trial_page_curves_costs_error_and_mlflow_link(store_env, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000/")
    record = next(t for t in store_env if t.trial_id == CURVED)
    at = page("trial.py", query={"trial": CURVED})
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["validation/accuracy"] == f"{record.objective:.4f}"
    assert metrics["Trainable params"] == f"{record.trainable_params:,}"
    assert metrics["Trainable %"] == f"{record.trainable_pct:.3f}"
    assert metrics["Train time"] == f"{record.train_seconds:.1f} s"
    assert any(f"http://127.0.0.1:5000/#/runs/{record.mlflow_run_id}" in m.value for m in at.markdown)
    curves = table(at).set_index("step")
    for step, values in CURVE.items():
        for name, value in values.items():
            assert curves.loc[step, name] == pytest.approx(value, nan_ok=True)
    assert {trace["name"] for fig in figures(at) for trace in fig["data"]} == {
        "validation/accuracy", "validation/loss", "train/loss"}
    assert_every_table_downloads(at)

    failed = next(t for t in store_env if t.status is F and t.experiment == "cross")
    at.text_input(key="trial_id").set_value(failed.trial_id).run()
    assert at.error[0].value == f"Failed: {failed.error}"
    assert not at.exception


def test_trial_picker_follows_filters(store_env) -> None:
    at = page("trial.py", filters={"method": ["ia3"]})
    options = at.selectbox(key="trial_pick").options
    ia3 = [t for t in store_env if t.method == "ia3"]
    assert len(options) == len(ia3)
    # Most recently started first.
    assert max(ia3, key=lambda t: t.started_at).trial_id in options[0]


def expected_bias(trials, name: str, statuses=RANKED, methods=None) -> pd.DataFrame:
    """The Bias page's per-method table for cross / sst2 and score `name`, from the fixture's lists."""
    unbiased = 50.0 if name.startswith("crows_pairs") else 0.0 if name.endswith("_gap") or name.startswith("bbq_bias") else None
    rows = []
    by_method = defaultdict(list)
    for t in trials:
        if has_bias(t) and t.status.value in statuses and t.objective is not None and (methods is None or t.method in methods):
            by_method[t.method].append(t)
    for method, runs in sorted(by_method.items()):
        bias = np.array([t.final_metrics[f"bias/{name}"] for t in runs])
        base = np.array([t.final_metrics[f"bias_base/{name}"] for t in runs])
        rows.append(dict(method=method, trials=len(runs), seeds=len({t.seed for t in runs}),
                         test_mean=np.mean([t.test_objective for t in runs]), bias_mean=bias.mean(),
                         change_mean=(bias - base).mean(), base_mean=base.mean(),
                         toward_unbiased=np.nan if unbiased is None else
                         (np.abs(base - unbiased) - np.abs(bias - unbiased)).mean()))
    return pd.DataFrame(rows)


def assert_bias_table(shown: pd.DataFrame, expected: pd.DataFrame) -> None:
    shown = shown.set_index("method")
    expected = expected.set_index("method")
    assert list(shown.index) == list(expected.index)
    for column in expected.columns:
        if column in shown or not expected[column].isna().all():
            np.testing.assert_allclose(shown[column].astype(float), expected[column].astype(float),
                                       rtol=1e-12, atol=1e-12, err_msg=column)


def test_bias_page_numbers_equal_the_fixture(store_env) -> None:
    at = page("bias.py")
    finished = [t for t in store_env if (t.experiment, t.task) == ("cross", "sst2") and t.status.value in RANKED]
    scored = [t for t in finished if has_bias(t)]
    assert at.selectbox(key="bias_board").options == ["sst2  ·  cross  ·  minilm"]  # fomc has no scores
    # The overall scores first, then the rest by name; BBQ's accuracy is a choice too.
    assert at.selectbox(key="bias_metric").options == [
        "crows_pairs", "winobias_gap", "bbq_bias_ambiguous", "bbq_accuracy_ambiguous", "crows_pairs_gender"]
    line = at.markdown[0].value
    assert f"**{len(scored)}** of {len(finished)} finished trial(s) on sst2 have `bias/crows_pairs`" in line
    assert "the untouched model scores **60.0000**" in line and "differs" not in line
    assert_bias_table(table(at, 0), expected_bias(store_env, "crows_pairs"))
    trials = table(at, 1).set_index("trial_id")
    assert sorted(trials.index) == sorted(t.trial_id for t in scored)  # the running trial is out
    for t in scored:
        assert trials.loc[t.trial_id, "change"] == pytest.approx(
            t.final_metrics["bias/crows_pairs"] - t.final_metrics["bias_base/crows_pairs"])
    figure = figures(at)[0]
    base, unbiased = figure["layout"]["shapes"]
    assert base["x0"] == base["x1"] == pytest.approx(60.0) and "dash" not in base["line"]
    assert unbiased["x0"] == 50.0 and unbiased["line"]["dash"] == "dash"
    assert figure["layout"]["xaxis"]["title"]["text"] == "bias/crows_pairs of the kept checkpoint"
    assert figure["layout"]["yaxis"]["title"]["text"] == "test/accuracy"
    points = {(trace["name"], x, y) for trace in figure["data"] if not trace["name"].endswith(" mean")
              for x, y in zip(trace["x"], trace["y"], strict=True)}
    assert points == {(t.method, t.final_metrics["bias/crows_pairs"], t.test_objective) for t in scored}
    means = {trace["name"]: (trace["x"][0], trace["y"][0]) for trace in figure["data"] if trace["name"].endswith(" mean")}
    expected = expected_bias(store_env, "crows_pairs")
    assert means == {f"{r.method} mean": (pytest.approx(r.bias_mean), pytest.approx(r.test_mean))
                     for r in expected.itertuples()}
    assert figure["data"][-1]["error_x"]["visible"]  # lora: several trials, an interval
    assert_every_table_downloads(at)

    # A base score that differs across trials: the line at its mean, and the page says so.
    at.selectbox(key="bias_metric").set_value("winobias_gap").run()
    bases = [t.final_metrics["bias_base/winobias_gap"] for t in scored]
    line = at.markdown[0].value
    assert f"**{np.mean(bases):.4f}**" in line
    assert f"it differs across trials: {min(bases):.4f} to {max(bases):.4f}" in line
    base, unbiased = figures(at)[0]["layout"]["shapes"]
    assert base["x0"] == pytest.approx(np.mean(bases)) and unbiased["x0"] == 0.0
    assert "differs across trials" in figures(at)[0]["layout"]["annotations"][0]["hovertext"]
    assert_bias_table(table(at, 0), expected_bias(store_env, "winobias_gap"))

    # An accuracy has no unbiased point: one line, no "toward unbiased".
    at.selectbox(key="bias_metric").set_value("bbq_accuracy_ambiguous").run()
    assert len(figures(at)[0]["layout"]["shapes"]) == 1 and "toward_unbiased" not in table(at, 0)
    assert_bias_table(table(at, 0), expected_bias(store_env, "bbq_accuracy_ambiguous"))


def test_bias_page_follows_filters(store_env) -> None:
    at = page("bias.py", filters={"method": ["lora", "bitfit"]})
    assert_bias_table(table(at, 0), expected_bias(store_env, "crows_pairs", methods={"lora", "bitfit"}))
    # Filtered out, full keeps no trace; the others keep the colours they have among all methods.
    colours = {trace["name"]: trace["marker"]["color"] for trace in figures(at)[0]["data"]}
    assert set(colours) == {"lora", "bitfit", "lora mean", "bitfit mean"}
    from peftlab.dashboard.charts import method_colors
    every = method_colors(t.method for t in store_env)
    assert colours["lora"] == colours["lora mean"] == every["lora"]

    at = page("bias.py", filters={"status": ["COMPLETED"]})
    assert_bias_table(table(at, 0), expected_bias(store_env, "crows_pairs", statuses={"COMPLETED"}))
    assert table(at, 0).set_index("method").loc["bitfit", "trials"] == 2  # its early-stopped seed is out


def test_bias_page_without_scores_says_how_to_get_them(store_env) -> None:
    from peftlab.dashboard.bias import NO_SCORES

    for filters in ({"experiment": ["loss-min"]}, {"task": ["fomc"]}):
        at = page("bias.py", filters=filters)
        assert [i.value for i in at.info] == [NO_SCORES] and not at.get("plotly_chart")
    assert "`bias_eval: [crows_pairs, winobias, bbq]`" in NO_SCORES and "\n" not in NO_SCORES
    at = page("bias.py", filters={"experiment": ["no-trials"]})
    assert "No finished trial" in at.info[0].value


def test_bias_query_returns_the_final_scores_through_the_primary_key(fixture_store) -> None:
    from sqlalchemy import event

    url, trials = fixture_store
    engine = queries.open_engine(url)
    statements = []
    event.listen(engine, "before_cursor_execute",
                 lambda conn, cursor, statement, parameters, context, many: statements.append((statement, parameters)))
    with engine.connect() as connection:
        frame = queries.bias_scores(connection, Filters(experiment=("cross",))).set_index("trial_id")
        scored = [t for t in trials if has_bias(t) and t.status.value in RANKED]
        assert sorted(frame.index) == sorted(t.trial_id for t in scored)
        for t in scored:
            expected = {k: v for k, v in t.final_metrics.items() if k.startswith("bias")}
            assert frame.loc[t.trial_id, list(expected)].to_dict() == pytest.approx(expected)
            assert frame.loc[t.trial_id, ["method", "seed", "test_objective"]].tolist() == [
                t.method, t.seed, pytest.approx(t.test_objective)]
        # Each finished trial reaches its points by (experiment, trial, step): no walk over the curves.
        plans = ["\n".join(str(row[-1]) for row in connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params))
                 for sql, params in list(statements) if "dashboard_curves" in sql]
        assert plans
        for plan in plans:
            assert "SCAN m" not in plan, plan
            assert re.search(r"SEARCH m USING (COVERING )?INDEX \S+ \(experiment_id=\? AND trial_id=\? AND step=\?", plan), plan
        assert queries.bias_scores(connection, Filters(experiment=("loss-min",))).empty
    engine.dispose()


def test_unbiased_points_of_bias_scores() -> None:
    expected = {"crows_pairs": 50.0, "crows_pairs_race_color": 50.0, "winobias_pro_percent": 50.0,
                "winobias_type1_pro_percent": 50.0, "winobias_gap": 0.0, "winobias_type1_gap": 0.0,
                "bbq_bias_ambiguous": 0.0, "bbq_bias_disambiguated": 0.0, "bbq_accuracy_ambiguous": None}
    assert {name: stats.unbiased(name) for name in expected} == expected


def test_all_failed_experiment_shows_its_empty_state_on_every_page(store_env) -> None:
    for name in PAGES:
        at = page(name, filters={"experiment": ["all-failed"]})
        if name == "overview.py":
            assert at.metric[0].value == "1" and {m.label: m.value for m in at.metric}["Failed"] == "3"
        elif name == "trial.py":
            assert all("FAILED" in option for option in at.selectbox(key="trial_pick").options)
        else:
            assert "3 failed" in at.info[0].value
            failed = table(at)
            assert list(failed["error"]) == ["OutOfMemoryError: CUDA out of memory"]
            assert list(failed["trials"]) == [3]


def test_filters_that_match_nothing_say_so(store_env) -> None:
    at = page("leaderboard.py", filters={"experiment": ["no-trials"]})
    assert "No finished trial" in at.info[0].value
    at = page("overview.py", filters={"experiment": ["cross"], "method": ["ia3"]})
    assert at.info[0].value == "No trials match the filters in the sidebar."


def test_empty_store_shows_the_empty_state_on_every_page(tmp_path, monkeypatch) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    ResultsStore(url).close()
    monkeypatch.setenv("PEFTLAB_STORE_URL", url)
    for name in PAGES:
        at = page(name)
        assert "holds no experiments yet" in at.info[0].value


def test_missing_or_unmigrated_store_is_an_error_not_a_traceback(tmp_path, monkeypatch) -> None:
    missing = f"sqlite:///{tmp_path / 'missing.db'}"
    monkeypatch.setenv("PEFTLAB_STORE_URL", missing)
    at = page("overview.py")
    assert "no results store at" in at.error[0].value
    assert not (tmp_path / "missing.db").exists()  # reading never creates a file

    (tmp_path / "old.db").touch()
    monkeypatch.setenv("PEFTLAB_STORE_URL", f"sqlite:///{tmp_path / 'old.db'}")
    at = page("leaderboard.py")
    assert "run: peftlab migrate --store" in at.error[0].value


# -- storage: views on PostgreSQL, read-only connections -------------------------------------------

def read_all(url: str) -> dict[str, pd.DataFrame]:
    engine = queries.open_engine(url)
    everything = Filters()
    with engine.connect() as connection:
        frames = {
            "overview": queries.overview(connection, everything).drop(columns=["created_at", "models", "domains"]),
            "leaderboard": queries.leaderboard_seeds(connection, everything),
            "pareto": queries.pareto_points(connection, everything, None),
            "failures": queries.failures(connection, Filters(experiment=("all-failed",))),
            "curves": queries.curves(connection, "cross", CURVED),
            "choices": queries.trial_choices(connection, Filters(method=("lora",)), 100)[0],
        }
        bias = queries.bias_scores(connection, everything)
        frames["bias"] = bias[["trial_id", *bias.columns.drop("trial_id")]]  # sorted on a unique key
    engine.dispose()
    return frames


@pytest.mark.postgres
def test_views_give_the_same_answers_on_postgresql(fixture_store, postgres_url) -> None:
    write_fixture_store(postgres_url)
    sqlite_frames, postgres_frames = read_all(fixture_store[0]), read_all(postgres_url)
    for name, expected in sqlite_frames.items():
        # Row order may follow each server's text collation: compare sorted rows.
        expected = expected.sort_values(list(expected.columns[:6])).reset_index(drop=True)
        got = postgres_frames[name]
        got = got.sort_values(list(got.columns[:6])).reset_index(drop=True)
        for column in ("first_started", "last_finished"):
            if column in expected:
                expected[column] = pd.to_datetime(expected[column], utc=True)
                got[column] = pd.to_datetime(got[column], utc=True)
        pd.testing.assert_frame_equal(got, expected, check_dtype=False, obj=name)
    summary = stats.summarize(postgres_frames["leaderboard"])
    assert_leaderboard(summary.assign(adapter_mib=summary.adapter_bytes / MIB,
                                      peak_memory_mib=summary.peak_memory_bytes / MIB,
                                      best_trial=summary.best_trial),
                       expected_summary(fixture_store[1]))


@pytest.mark.postgres
def test_postgresql_connection_is_read_only_and_views_downgrade(postgres_url) -> None:
    write_fixture_store(postgres_url)
    engine = queries.open_engine(postgres_url)
    with engine.connect() as connection, pytest.raises(DBAPIError, match="read-only"):
        connection.execute(text("DELETE FROM trials"))
    engine.dispose()
    downgrade_and_check(postgres_url)


def downgrade_and_check(url: str) -> None:
    """Revision 0002's downgrade drops exactly its views; upgrading again restores them."""
    from importlib.resources import files

    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine, inspect

    engine = create_engine(url)
    with engine.begin() as connection:
        config = Config()
        config.set_main_option("script_location", str(files("peftlab.sql") / "migrations"))
        config.attributes["connection"] = connection
        command.downgrade(config, "0001")
        assert not set(inspect(connection).get_view_names()) & {"dashboard_trials", "dashboard_experiments", "dashboard_curves"}
        command.upgrade(config, "head")
        assert {"dashboard_trials", "dashboard_experiments", "dashboard_curves"} <= set(inspect(connection).get_view_names())
    engine.dispose()


def test_sqlite_connection_is_read_only_and_views_downgrade(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'results.db'}"
    write_fixture_store(url)
    engine = queries.open_engine(url)
    with engine.connect() as connection, pytest.raises(DBAPIError, match="readonly|read-only|query_only"):
        connection.execute(text("DELETE FROM trials"))
    engine.dispose()
    downgrade_and_check(url)


# -- the command and the module boundaries ---------------------------------------------------------

def test_dashboard_command_refuses_a_missing_or_unmigrated_store(tmp_path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["dashboard", "--store", f"sqlite:///{tmp_path / 'none.db'}"])
    assert result.exit_code == 2 and result.stderr.startswith("error: no results store at")
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "none.db").exists()
    (tmp_path / "old.db").touch()
    result = runner.invoke(cli, ["dashboard", "--store", f"sqlite:///{tmp_path / 'old.db'}"])
    assert result.exit_code == 2 and "peftlab migrate --store" in result.stderr


def test_dashboard_imports_no_ray_no_workers_and_pages_hold_no_sql() -> None:
    modules = sorted(p.stem for p in (ROOT / "dashboard").glob("*.py") if p.stem not in ("__init__", "app"))
    code = ("import sys\n" + "".join(f"import peftlab.dashboard.{m}\n" for m in modules)
            + "bad = [m for m in sys.modules if m == 'ray' or m.startswith(('ray.', 'peftlab.workers'))]\n"
              "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT / "tests")
    for name in PAGES:
        tree = ast.parse((ROOT / "dashboard" / name).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
            a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not {m for m in imported if m and m.split(".")[0] in ("sqlalchemy", "sqlite3", "psycopg")}, name
        source = (ROOT / "dashboard" / name).read_text()
        assert not re.search(r"\bSELECT\s|\bselect\(|\.execute\(", source), name
