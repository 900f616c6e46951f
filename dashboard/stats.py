"""The dashboard's statistics: bootstrap intervals over seeds, winners and ties, ranks, the
normalized score per domain and Pareto membership. Pure numpy/pandas on already-reduced rows.

Definitions (the dashboard states them where it shows them):
- CI: 95% percentile bootstrap of the mean over a configuration's seeds, 2,000 resamples drawn
  by `numpy.random.default_rng(0)` from the sorted values, so the same values always give the
  same interval. One seed gives the single value as its interval.
- Verdict: `best` is the method whose best configuration has the best mean (highest score).
  Every other method is compared with it on the seeds both ran (a seed gives both the same data
  order), by a two-sided paired t-test on the per-seed score differences (differences without
  spread: the exact sign test, p = 2 * 0.5**n); the p-values of a board's methods are
  Holm-corrected together. `worse`: corrected p < 0.05; `tied`: not
  separated at that level; `untested`: fewer than two shared seeds, so nothing can be judged.
- Rank: 1 = best mean on a task (experiment and task); equal means share the average rank.
- Normalized score: the method's mean minus the best method's mean on the same task, in the
  metric's units, signed so that 0 is the best and below 0 is worse (for a 'min' metric such
  as loss, a method 0.02 above the best loss scores -0.02). A domain's cell is the average of
  its tasks' normalized scores.
- Pareto front: the trials that no other trial beats on both axes: none has a cost <= and a
  score >= with one of the two strict.
- Bias: a trial's `bias/<name>` is scored on its kept checkpoint, `bias_base/<name>` on the same
  model before the method was applied; change = bias - base. Unbiased is 50 for percentages
  (crows_pairs*, *percent) and 0 for gaps and BBQ bias scores; BBQ accuracies have no such point.
  A method's means are over its trials with that score (every configuration and seed), each with
  the bootstrap CI above.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from peftlab.store import BIAS, HEADLINE_BIAS

CONFIDENCE = 0.95
ALPHA = 0.05
TEST = "paired t-test over seeds, Holm-corrected across methods"
FLAT = 1e-9
"""Per-seed differences that spread less than this (relative) are taken as constant."""
RESAMPLES = 2_000
SEED = 0
BOARD = ["experiment", "task", "model"]
"""A leaderboard is per task of an experiment: methods compete on the same data, model and metric."""


def bootstrap_ci(
    values, *, confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = SEED
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean; (x, x) for one value, (nan, nan) for none."""
    x = np.sort(np.asarray(values, dtype=float))
    if x.size == 0:
        return (float("nan"), float("nan"))
    if x.size == 1 or x[0] == x[-1]:
        return (float(x[0]), float(x[0]))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0 * 100.0
    lo, hi = np.percentile(means, [tail, 100.0 - tail])
    return (float(lo), float(hi))


def on_test(seeds: pd.DataFrame) -> pd.DataFrame:
    """Seed rows whose `objective` and `score` are the test split's (where the rows carry
    `test_objective`), the validation values kept as `validation_objective` / `validation_score`:
    configurations are chosen on validation, and reported on test. A trial never tested (a store
    from before test splits) has NaN there: missing, not zero."""
    if "test_objective" not in seeds.columns:
        return seeds.assign(validation_objective=seeds["objective"], validation_score=seeds["score"])
    return seeds.assign(validation_objective=seeds["objective"], validation_score=seeds["score"],
                        objective=seeds["test_objective"].astype(float), score=seeds["test_score"].astype(float))


def summarize(seeds: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, method) from the seed rows of each method's best configuration.

    `seeds` has one row per trial: BOARD columns, method, objective, score and costs, and where
    they were tested test_objective and test_score: the statistics (mean, std, CI, verdicts,
    ranks) are then of the test values, with `validation_mean` beside them. The result has mean,
    ci_lo, ci_hi, n_seeds, the mean costs, and the best-first order of each board.
    """
    seeds = on_test(seeds)
    keys = [*BOARD, "method"]
    firsts = [c for c in ("domain", "metric", "mode", "config", "hparams", "n_configs",
                          "n_trials") if c in seeds.columns]
    costs = [c for c in ("trainable_params", "total_params", "trainable_pct", "adapter_bytes",
                         "peak_memory_bytes", "train_seconds", "samples_per_second")
             if c in seeds.columns]
    grouped = seeds.groupby(keys, sort=False)
    out = grouped[firsts].first()
    out["mean"] = grouped["objective"].mean()
    out["validation_mean"] = grouped["validation_objective"].mean()
    out["score"] = grouped["score"].mean()
    out["n_seeds"] = grouped["objective"].size()
    out["std"] = grouped["objective"].std(ddof=1)
    intervals = [bootstrap_ci(values.to_numpy()) for _, values in grouped["objective"]]
    out["ci_lo"] = [lo for lo, _ in intervals]
    out["ci_hi"] = [hi for _, hi in intervals]
    out[costs] = grouped[costs].mean()
    # The seed that scored best on validation is the trial the Trial page opens for this row.
    out["best_trial"] = seeds.loc[grouped["validation_score"].idxmax(), keys + ["trial_id"]].set_index(keys)["trial_id"]
    out = out.reset_index()
    out = paired_verdicts(out, seeds)
    out["rank"] = ranks(out)
    return out.sort_values([*BOARD, "score", "method"],
                           ascending=[True] * len(BOARD) + [False, True], ignore_index=True)


def paired_p(differences: np.ndarray) -> float:
    """Two-sided paired t-test p-value of per-seed differences. Differences without spread leave
    the t statistic undefined (0/0, or infinite): all zero give 1, all alike the exact two-sided
    sign test's 2 * 0.5**n, so a constant gap over few seeds is not taken for certainty."""
    from scipy import stats as scipy_stats

    if np.ptp(differences) <= FLAT * max(1.0, float(np.abs(differences).max())):
        return 1.0 if np.allclose(differences, 0.0) else min(1.0, 2 * 0.5 ** len(differences))
    return float(scipy_stats.ttest_1samp(differences, 0.0).pvalue)


def holm(p_values: dict) -> dict:
    """Holm's step-down adjustment of a family of p-values (keys kept)."""
    adjusted, running = {}, 0.0
    ordered = sorted(p_values, key=lambda key: p_values[key])
    for position, key in enumerate(ordered):
        running = max(running, min(1.0, (len(ordered) - position) * p_values[key]))
        adjusted[key] = running
    return adjusted


def paired_verdicts(summary: pd.DataFrame, seeds: pd.DataFrame, *, alpha: float = ALPHA) -> pd.DataFrame:
    """Add `verdict` (best, tied, worse, untested), `n_paired` (seeds shared with the best), `p_value`
    and `p_holm` to a summary, from the seed rows (one per trial: BOARD, method, seed, score) of
    each method's best configuration."""
    out = summary.copy()
    out["verdict"], out["n_paired"] = "untested", 0
    out["p_value"], out["p_holm"] = np.nan, np.nan
    # Best mean score first; equal means are split by method name, so the best is stable.
    ordered = out.sort_values([*BOARD, "score", "method"], ascending=[True] * len(BOARD) + [False, True])
    per_seed = seeds.groupby([*BOARD, "method", "seed"])["score"].mean()  # sorted, for lookups
    for key, board in ordered.groupby(BOARD, sort=False):
        scores = {method: per_seed.loc[(*key, method)] for method in board["method"]}
        first = board.index[0]
        out.loc[first, ["verdict", "n_paired"]] = ["best", len(scores[board.loc[first, "method"]])]
        p_values, gaps = {}, {}
        for index in board.index[1:]:
            gap = (scores[board.loc[first, "method"]] - scores[board.loc[index, "method"]]).dropna()
            out.loc[index, "n_paired"] = len(gap)
            if len(gap) >= 2:
                p_values[index], gaps[index] = paired_p(gap.to_numpy()), float(gap.mean())
        for index, adjusted in holm(p_values).items():
            out.loc[index, ["p_value", "p_holm"]] = [p_values[index], adjusted]
            out.loc[index, "verdict"] = "worse" if adjusted < alpha and gaps[index] > 0 else "tied"
    out["n_paired"] = out["n_paired"].astype(int)
    return out


def ranks(summary: pd.DataFrame) -> pd.Series:
    """Rank of each method on its board: 1 = best mean score, ties share the average rank."""
    return summary.groupby(BOARD, sort=False)["score"].rank(ascending=False, method="average")


def normalized(summary: pd.DataFrame) -> pd.Series:
    """Mean score minus the best mean score on the same board: 0 for the best, < 0 for worse."""
    return summary["score"] - summary.groupby(BOARD, sort=False)["score"].transform("max")


def domain_matrix(summary: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(normalized score, number of tasks) per method x domain, and ranks per method.

    The rank table has the average rank over all tasks a method ran on, the number of those
    tasks and, per domain, the average rank within it.
    """
    frame = summary.assign(normalized=normalized(summary), rank=ranks(summary))
    score = frame.pivot_table(index="method", columns="domain", values="normalized", aggfunc="mean")
    tasks = frame.pivot_table(index="method", columns="domain", values="normalized", aggfunc="size")
    # A domain whose tasks have no test score yet (a store from before test splits) stays, empty.
    score = score.reindex(index=tasks.index, columns=tasks.columns)
    by_domain = frame.pivot_table(index="method", columns="domain", values="rank", aggfunc="mean")
    overall = frame.groupby("method").agg(average_rank=("rank", "mean"), tasks=("rank", "size"))
    rank_table = overall.join(by_domain.add_prefix("rank: ")).sort_values(["average_rank", "tasks"],
                                                                            ascending=[True, False])
    order = rank_table.index
    return score.reindex(order), tasks.reindex(order).fillna(0).astype(int), rank_table.reset_index()


def pareto_front(cost, score) -> np.ndarray:
    """Boolean mask of the points not dominated when lower cost and higher score are better.

    A point is dominated when another has cost <= and score >= with at least one strict;
    equal points do not dominate each other. NaN in either coordinate is never on the front.
    O(n log n): sort by cost, keep a running best score over strictly cheaper points.
    """
    cost = np.asarray(cost, dtype=float)
    score = np.asarray(score, dtype=float)
    front = np.zeros(cost.size, dtype=bool)
    valid = np.flatnonzero(np.isfinite(cost) & np.isfinite(score))
    if valid.size == 0:
        return front
    order = valid[np.lexsort((-score[valid], cost[valid]))]  # by cost, then best score first
    c, s = cost[order], score[order]
    # Best score at each distinct cost, and the best over all strictly cheaper costs.
    starts = np.flatnonzero(np.r_[True, c[1:] != c[:-1]])
    top_at_cost = s[starts]
    cheaper_best = np.r_[-np.inf, np.maximum.accumulate(top_at_cost)[:-1]]
    group = np.cumsum(np.r_[True, c[1:] != c[:-1]]) - 1
    front[order] = (s == top_at_cost[group]) & (top_at_cost[group] > cheaper_best[group])
    return front


# -- bias --------------------------------------------------------------------------------------

SAME = 1e-9
"""Base scores that spread less than this (relative) across trials are one value."""


def unbiased(name: str) -> float | None:
    """Where a bias score of this name is unbiased; None for what has no such point (accuracy)."""
    if name.startswith("crows_pairs") or name.endswith("percent"):
        return 50.0
    if name.endswith("_gap") or name.startswith("bbq_bias_"):
        return 0.0
    return None


def bias_names(frame: pd.DataFrame, prefix: str = BIAS) -> list[str]:
    """The bias scores (names without `prefix`) that some row of `frame` has: the headline scores
    first, then the rest by name."""
    names = [c.removeprefix(prefix) for c in frame.columns if c.startswith(prefix) and frame[c].notna().any()]
    order = {name: i for i, name in enumerate(HEADLINE_BIAS)}
    return sorted(names, key=lambda n: (order.get(n, len(order)), n))


def base_reference(base: pd.Series) -> dict:
    """The untouched model's score as the reference: its mean over the trials, its range, and
    whether it differs across trials (it should not: one model, the same evaluation data)."""
    values = base.dropna().astype(float)
    if values.empty:
        return dict(mean=float("nan"), lo=float("nan"), hi=float("nan"), n=0, differs=False)
    lo, hi, mean = float(values.min()), float(values.max()), float(values.mean())
    return dict(mean=mean, lo=lo, hi=hi, n=len(values), differs=hi - lo > SAME * max(1.0, abs(mean)))


def bias_by_method(trials: pd.DataFrame, name: str) -> pd.DataFrame:
    """Per method, from one task's trial rows carrying `test_objective`, `bias` and `base` (the
    chosen score and its base): trials, seeds, the means of the test score, the bias score and
    the change from the base, each with its CI; and, where the score has an unbiased point, the
    mean move toward it (|base - unbiased| - |bias - unbiased|: > 0 = less biased than the base)."""
    point = unbiased(name)
    rows = []
    for method, group in trials.groupby("method", sort=True):
        row: dict = {"method": method, "trials": len(group), "seeds": group["seed"].nunique()}
        change = group["bias"] - group["base"]
        for column, values in (("test", group["test_objective"]), ("bias", group["bias"]),
                               ("change", change)):
            values = values.dropna().astype(float)
            lo, hi = bootstrap_ci(values.to_numpy())
            row.update({f"{column}_mean": values.mean() if len(values) else np.nan,
                        f"{column}_ci_lo": lo, f"{column}_ci_hi": hi})
        row["base_mean"] = group["base"].mean()
        row["toward_unbiased"] = (np.nan if point is None else
                                  ((group["base"] - point).abs() - (group["bias"] - point).abs()).mean())
        rows.append(row)
    return pd.DataFrame(rows)
