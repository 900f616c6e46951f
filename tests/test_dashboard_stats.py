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


def test_winner_and_ties_by_interval_overlap() -> None:
    frame = board([("a", 0.90, 0.88, 0.92), ("b", 0.87, 0.85, 0.89), ("c", 0.80, 0.79, 0.81),
                   ("d", 0.86, 0.80, 0.88)])
    verdicts = dict(zip(frame["method"], stats.mark_ties(frame)["verdict"], strict=True))
    # b's interval touches a's (0.89 >= 0.88): tied; d ends exactly at a's lower bound: tied
    # (closed intervals); c is apart.
    assert verdicts == {"a": "winner", "b": "tied", "c": "", "d": "tied"}


def test_equal_means_pick_one_winner_by_name_and_tie_the_other() -> None:
    frame = board([("z", 0.9, 0.9, 0.9), ("a", 0.9, 0.9, 0.9)])
    assert list(stats.mark_ties(frame)["verdict"]) == ["tied", "winner"]


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
    assert list(out["rank"]) == [1.0, 2.0] and list(out["verdict"]) == ["winner", ""]
    for method, values in itertools.groupby(rows, key=lambda r: r[0]):
        ci = stats.bootstrap_ci([v for _, _, v in values])
        row = out.set_index("method").loc[method]
        assert (row["ci_lo"], row["ci_hi"]) == ci
