"""Cached loading: queries.py run on a cached read-only engine, stats.py applied to their rows.

Every result is cached per (store URL, filters, arguments) for TTL seconds, so switching pages
or widgets reruns no query; the sidebar's Reload button clears the cache for fresh trials.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd
import streamlit as st
from sqlalchemy import Engine

from peftlab.dashboard import queries, stats
from peftlab.dashboard.queries import Filters

TTL = 30
"""Seconds a cached result lives: a running sweep's trials show up without a reload."""
TRIAL_CHOICES = 1_000
"""The Trial page's picker lists this many trials; any other one opens by its id."""


@st.cache_resource(show_spinner=False)
def engine(url: str) -> Engine:
    """One read-only engine per store URL, made at first use (never at import)."""
    return queries.open_engine(url)


def _read(url: str, query: Callable[..., Any], *args: Any) -> Any:
    with engine(url).connect() as connection:
        return query(connection, *args)


@st.cache_data(ttl=TTL, show_spinner=False)
def filter_options(url: str) -> dict[str, list[str]]:
    return _read(url, queries.filter_options)


@st.cache_data(ttl=TTL, show_spinner=False)
def overview(url: str, filters: Filters) -> pd.DataFrame:
    return _read(url, queries.overview, filters)


@st.cache_data(ttl=TTL, show_spinner=False)
def failures(url: str, filters: Filters) -> pd.DataFrame:
    return _read(url, queries.failures, filters)


@st.cache_data(ttl=TTL, show_spinner=False)
def leaderboard(url: str, filters: Filters) -> pd.DataFrame:
    """Per task and method: the best configuration's mean, CI, verdict, rank and mean costs."""
    seeds = _read(url, queries.leaderboard_seeds, filters)
    return pd.DataFrame() if seeds.empty else stats.summarize(seeds)


@st.cache_data(ttl=TTL, show_spinner=False)
def domain_matrix(url: str, filters: Filters) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame] | None:
    summary = leaderboard(url, filters)
    return None if summary.empty else stats.domain_matrix(summary)


@st.cache_data(ttl=TTL, show_spinner=False)
def boards(url: str, filters: Filters) -> pd.DataFrame:
    return _read(url, queries.boards, filters)


@st.cache_data(ttl=TTL, show_spinner=False)
def pareto(url: str, filters: Filters, board: tuple[str, str, str] | None, cost: str) -> pd.DataFrame:
    """Points with `on_front` against `cost`. For one task: its finished trials, on the score.
    Across tasks: each method's best configuration per task (the leaderboard's rows, mean costs),
    on `gap`, the normalized score (difference to the task's best method)."""
    if board is None:
        summary = leaderboard(url, filters)
        if summary.empty:
            return summary
        points = summary.assign(trial_id=summary["best_trial"], objective=summary["mean"],
                                gap=stats.normalized(summary))
        points["on_front"] = stats.pareto_front(points[cost], points["gap"])
        return points
    points = _read(url, queries.pareto_points, filters, board)
    if not points.empty:
        points["on_front"] = stats.pareto_front(points[cost], points["score"])
    return points


@st.cache_data(ttl=TTL, show_spinner=False)
def methods_on(url: str, filters: Filters, board: tuple[str, str, str] | None) -> list[str]:
    return _read(url, queries.methods_on, filters, board)


@st.cache_data(ttl=TTL, show_spinner=False)
def sensitivity(url: str, filters: Filters, board: tuple[str, str, str] | None, method: str) -> pd.DataFrame:
    """One method's finished trials with one column per hyperparameter (`hp:NAME`)."""
    trials = _read(url, queries.sensitivity_trials, filters, board, method)
    if trials.empty:
        return trials
    hparams = pd.json_normalize(trials["hparams"].map(queries.parse_hparams).tolist(), max_level=0)
    hparams.columns = [f"hp:{name}" for name in hparams.columns]
    return pd.concat([trials.drop(columns="hparams"), hparams], axis=1)


@st.cache_data(ttl=TTL, show_spinner=False)
def trial_choices(url: str, filters: Filters) -> tuple[pd.DataFrame, int]:
    return _read(url, queries.trial_choices, filters, TRIAL_CHOICES)


@st.cache_data(ttl=TTL, show_spinner=False)
def experiments_of(url: str, trial_id: str) -> list[str]:
    return _read(url, queries.experiments_of, trial_id)


@st.cache_data(ttl=TTL, show_spinner=False)
def trial(url: str, experiment: str, trial_id: str) -> dict[str, Any] | None:
    return _read(url, queries.trial, experiment, trial_id)


@st.cache_data(ttl=TTL, show_spinner=False)
def curves(url: str, experiment: str, trial_id: str) -> pd.DataFrame:
    return _read(url, queries.curves, experiment, trial_id)


@st.cache_data(ttl=TTL, show_spinner=False)
def bias_scores(url: str, filters: Filters) -> pd.DataFrame:
    return _read(url, queries.bias_scores, filters)


@st.cache_data(ttl=TTL, show_spinner=False)
def bias_boards(url: str, filters: Filters) -> dict[tuple[str, str, str], list[str]]:
    """The tasks (experiment, task, model) whose finished trials have bias scores, with the names
    of those scores."""
    frame = bias_scores(url, filters)
    if frame.empty:
        return {}
    found = {tuple(key): stats.bias_names(rows) for key, rows in frame.groupby(list(queries.BOARD), sort=True)}
    return {key: names for key, names in found.items() if names}


@st.cache_data(ttl=TTL, show_spinner=False)
def bias_board(url: str, filters: Filters, board: tuple[str, str, str],
               name: str) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """One task's trials with the score `name` (as `bias`, its base as `base`, `change` = bias -
    base), the per-method summary and the base model's reference (stats.base_reference)."""
    frame = bias_scores(url, filters)
    rows = frame.loc[(frame[list(queries.BOARD)] == pd.Series(board, index=list(queries.BOARD))).all(axis=1)]
    rows = rows.loc[rows[f"{queries.BIAS}{name}"].notna()]
    base = rows[f"{queries.BIAS_BASE}{name}"] if f"{queries.BIAS_BASE}{name}" in rows else float("nan")
    trials = rows[["method", "seed", "trial_id", "status", "test_objective", "hparams"]].assign(
        bias=rows[f"{queries.BIAS}{name}"].astype(float), base=base)
    trials["base"] = trials["base"].astype(float)
    trials = trials.assign(change=trials["bias"] - trials["base"]).reset_index(drop=True)
    return trials, stats.bias_by_method(trials, name), stats.base_reference(trials["base"])
