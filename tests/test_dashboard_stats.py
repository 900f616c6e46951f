"""The dashboard's statistics against cases whose answers are known by hand."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from peftlab.dashboard import stats


def test_bootstrap_degenerate_cases() -> None:
    assert stats.bootstrap_ci([0.7]) == (0.7, 0.7)
    assert stats.bootstrap_ci([0.5, 0.5, 0.5]) == (0.5, 0.5)
    lo, hi = stats.bootstrap_ci([])
    assert np.isnan(lo) and np.isnan(hi)


def test_bootstrap_of_two_values_spans_them() -> None:
    # Resample means of [0, 1] are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4: the 2.5th and
    # 97.5th percentiles of 2,000 draws are the extremes.
    assert stats.bootstrap_ci([1.0, 0.0]) == (0.0, 1.0)


def test_bootstrap_is_deterministic_order_free_and_matches_a_plain_loop() -> None:
    values = [0.91, 0.88, 0.93, 0.90, 0.87]
    lo, hi = stats.bootstrap_ci(values)
    assert (lo, hi) == stats.bootstrap_ci(list(reversed(values)))
    # The same percentile bootstrap written out: same generator, same draws, sorted values.
    x = np.sort(values)
    rng = np.random.default_rng(0)
    draws = rng.integers(0, len(x), size=(2000, len(x)))
    means = [x[row].mean() for row in draws]
    assert (lo, hi) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])))
    assert min(values) <= lo < np.mean(values) < hi <= max(values)


def test_bootstrap_narrows_with_more_seeds() -> None:
    rng = np.random.default_rng(1)
    few, many = rng.normal(0.9, 0.02, 3), rng.normal(0.9, 0.02, 300)
    (lo_few, hi_few), (lo_many, hi_many) = stats.bootstrap_ci(few), stats.bootstrap_ci(many)
    assert hi_many - lo_many < hi_few - lo_few


def board(rows: list[tuple[str, float, float, float]], task: str = "t") -> pd.DataFrame:
    """Summary rows (method, score, ci_lo, ci_hi) of one max-mode board."""
    frame = pd.DataFrame(rows, columns=["method", "score", "ci_lo", "ci_hi"])
    return frame.assign(experiment="e", task=task, model="m", mean=frame["score"])


def seed_rows(scores: dict[str, list[float | None]], task: str = "t") -> pd.DataFrame:
    """One row per (method, seed) of one board; None: that seed did not run."""
    return pd.DataFrame([{"experiment": "e", "task": task, "model": "m", "method": method, "seed": seed,
                          "score": value, "objective": value, "trial_id": f"{method}{seed}"}
                         for method, values in scores.items() for seed, value in enumerate(values)
                         if value is not None])


def verdicts_of(scores: dict[str, list[float | None]]) -> pd.DataFrame:
    seeds = seed_rows(scores)
    means = seeds.groupby("method", sort=False)["score"].mean()
    summary = board([(method, mean, mean, mean) for method, mean in means.items()])
    return stats.paired_verdicts(summary, seeds).set_index("method")


def test_holm_adjusts_step_down_and_stays_monotone() -> None:
    # Sorted: 0.01 * 3 = 0.03; 0.03 * 2 = 0.06; 0.04 * 1 = 0.04, raised to the 0.06 before it.
    assert stats.holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})
    assert stats.holm({"a": 0.6, "b": 0.7}) == {"a": 1.0, "b": 1.0}
    assert stats.holm({}) == {}


def test_paired_verdicts_follow_a_paired_t_test_with_holm() -> None:
    from scipy.stats import ttest_rel

    scores = {
        "best": [0.90, 0.91, 0.89, 0.92, 0.90],
        "worse": [0.85, 0.85, 0.85, 0.86, 0.83],  # below the best on every seed, by 0.04 to 0.07
        "tied": [0.91, 0.88, 0.90, 0.90, 0.91],  # above on some seeds, below on others
        "once": [0.80, None, None, None, None],  # one seed shared: nothing to judge
    }
    out = verdicts_of(scores)
    assert out["verdict"].to_dict() == {"best": "best", "worse": "worse", "tied": "tied", "once": "untested"}
    assert out["n_paired"].to_dict() == {"best": 5, "worse": 5, "tied": 5, "once": 1}
    raw = {m: ttest_rel(scores["best"], scores[m]).pvalue for m in ("worse", "tied")}
    assert out.loc["worse", "p_value"] == pytest.approx(raw["worse"])
    assert out.loc["tied", "p_value"] == pytest.approx(raw["tied"])
    # Two tested methods: the smaller p doubled, the larger kept (no smaller than the first).
    assert out.loc["worse", "p_holm"] == pytest.approx(2 * raw["worse"])
    assert out.loc["tied", "p_holm"] == pytest.approx(max(raw["tied"], 2 * raw["worse"]))
    assert np.isnan(out.loc["once", "p_holm"]) and np.isnan(out.loc["best", "p_holm"])


def test_holm_can_turn_a_raw_rejection_into_a_tie() -> None:
    # Three methods a little below the best (seeded draws); Holm corrects for comparing all three.
    rng = np.random.default_rng(0)
    base = rng.normal(0.9, 0.01, 6)
    scores = {"best": list(base)}
    for name, shift in (("a", 0.004), ("b", 0.0045), ("c", 0.005)):
        scores[name] = list(base - shift + rng.normal(0, 0.004, 6))
    out = verdicts_of(scores)
    raw, corrected = out["p_value"].drop("best"), out["p_holm"].drop("best")
    assert (corrected >= raw).all()
    assert ((out["verdict"] == "worse") == (out["p_holm"] < stats.ALPHA)).drop("best").all()
    # c alone would be worse (p = 0.037); among three comparisons it is not separated from the best.
    assert out.loc["c", "p_value"] < stats.ALPHA <= out.loc["c", "p_holm"] and out.loc["c", "verdict"] == "tied"
    assert out.loc["b", "verdict"] == "worse"


def test_equal_scores_on_every_seed_are_tied_and_the_best_is_picked_by_name() -> None:
    out = verdicts_of({"z": [0.9, 0.8], "a": [0.9, 0.8]})
    assert out["verdict"].to_dict() == {"a": "best", "z": "tied"}
    assert out.loc["z", "p_value"] == 1.0


def test_a_constant_gap_is_judged_by_the_sign_test() -> None:
    # Equal gaps on every seed: t is infinite; the sign test needs six seeds to reach p < 0.05.
    two = verdicts_of({"a": [0.9, 0.8], "b": [0.85, 0.75]})
    assert two.loc["b", "p_value"] == 0.5 and two.loc["b", "verdict"] == "tied"
    six = verdicts_of({"a": [0.9] * 6, "b": [0.85] * 6})
    assert six.loc["b", "p_value"] == pytest.approx(2 / 64) and six.loc["b", "verdict"] == "worse"


def test_one_seed_per_method_leaves_every_method_untested() -> None:
    out = verdicts_of({"lora": [0.9], "dora": [0.8], "ia3": [0.7]})
    assert out["verdict"].to_dict() == {"lora": "best", "dora": "untested", "ia3": "untested"}


def test_ranks_average_equal_scores_per_board() -> None:
    frame = pd.concat([board([("a", 0.9, 0, 1), ("b", 0.8, 0, 1), ("c", 0.8, 0, 1)], task="t1"),
                       board([("a", 0.5, 0, 1), ("b", 0.7, 0, 1)], task="t2")], ignore_index=True)
    assert list(stats.ranks(frame)) == [1.0, 2.5, 2.5, 2.0, 1.0]
    assert list(stats.normalized(frame)) == pytest.approx([0.0, -0.1, -0.1, -0.2, 0.0])


def test_domain_matrix_averages_tasks_and_counts_them() -> None:
    frame = pd.concat([board([("a", 0.9, 0, 1), ("b", 0.8, 0, 1)], task="t1").assign(domain="nlp"),
                       board([("a", 0.6, 0, 1), ("b", 0.7, 0, 1)], task="t2").assign(domain="nlp"),
                       board([("a", 0.3, 0, 1)], task="t3").assign(domain="vision")],
                      ignore_index=True)
    score, tasks, rank_table = stats.domain_matrix(frame)
    assert score.loc["a", "nlp"] == pytest.approx(-0.05) and score.loc["b", "nlp"] == pytest.approx(-0.05)
    assert score.loc["a", "vision"] == 0.0 and np.isnan(score.loc["b", "vision"])
    assert tasks.loc["a"].tolist() == [2, 1] and tasks.loc["b"].tolist() == [2, 0]
    ranks = rank_table.set_index("method")
    assert ranks.loc["a", "average_rank"] == pytest.approx(4 / 3) and ranks.loc["a", "tasks"] == 3
    assert ranks.loc["b", "average_rank"] == 1.5 and list(rank_table["method"]) == ["a", "b"]


def brute_force_front(cost, score) -> list[bool]:
    points = list(zip(cost, score, strict=True))
    def dominated(p):
        return any(q[0] <= p[0] and q[1] >= p[1] and (q[0] < p[0] or q[1] > p[1]) for q in points)
    return [not (np.isnan(p[0]) or np.isnan(p[1])) and not dominated(p) for p in points]


def test_pareto_front_known_case() -> None:
    cost = [1, 2, 2, 3, 4, 4, 5]
    score = [0.5, 0.7, 0.6, 0.7, 0.9, 0.9, 0.8]
    # (2,0.6) loses to (2,0.7); (3,0.7) to (2,0.7); (5,0.8) to (4,0.9); the two (4,0.9) tie.
    assert stats.pareto_front(cost, score).tolist() == [True, True, False, False, True, True, False]


def test_pareto_front_ignores_missing_and_matches_brute_force() -> None:
    assert stats.pareto_front([1.0, np.nan, 3.0], [0.1, 0.9, np.nan]).tolist() == [True, False, False]
    rng = np.random.default_rng(3)
    for n in (1, 2, 10, 60):
        cost = rng.integers(1, 8, n).astype(float)  # small ranges: many equal costs and scores
        score = rng.integers(0, 5, n) / 4
        assert stats.pareto_front(cost, score).tolist() == brute_force_front(cost, score)


def test_summarize_picks_best_seed_and_orders_best_first() -> None:
    rows = [("lora", 0, 0.90), ("lora", 1, 0.92), ("bitfit", 0, 0.80), ("bitfit", 1, 0.84)]
    seeds = pd.DataFrame([{"experiment": "e", "task": "t", "model": "m", "method": m, "seed": s,
                           "trial_id": f"{m}{s}", "objective": v, "score": v, "train_seconds": 10.0 + s}
                          for m, s, v in rows])
    out = stats.summarize(seeds)
    assert list(out["method"]) == ["lora", "bitfit"]
    assert list(out["best_trial"]) == ["lora1", "bitfit1"]
    assert out["mean"].tolist() == pytest.approx([0.91, 0.82])
    assert out["train_seconds"].tolist() == [10.5, 10.5] and list(out["n_seeds"]) == [2, 2]
    # Paired differences 0.10 and 0.08: t = 9 on 1 degree of freedom, p = 0.07: not separated.
    assert list(out["rank"]) == [1.0, 2.0] and list(out["verdict"]) == ["best", "tied"]
    for method, values in itertools.groupby(rows, key=lambda r: r[0]):
        ci = stats.bootstrap_ci([v for _, _, v in values])
        row = out.set_index("method").loc[method]
        assert (row["ci_lo"], row["ci_hi"]) == ci
