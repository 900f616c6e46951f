"""Widgets every page shares: the sidebar (store, filters, reload), the page context, tables
that download as CSV, and the empty states.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import pandas as pd
import streamlit as st
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from peftlab import settings
from peftlab.dashboard import loaders
from peftlab.dashboard.queries import BOARD, STATUSES, Filters
from peftlab.store import SMOKE_SUFFIX

FILTERS = {"experiment": "Experiment", "domain": "Domain", "task": "Task", "model": "Model",
           "method": "Method", "status": "Status"}
MIB = 2**20
NO_EXPERIMENTS = ("The results store holds no experiments yet. Run a sweep, for example "
                  "`peftlab run examples/quickstart.yaml`, then reload.")
NO_MATCH = "No trials match the filters in the sidebar."


@dataclass(frozen=True)
class Context:
    """What a page needs: the store, the sidebar's filters, and MLflow's URI if known."""

    url: str
    filters: Filters
    tracking_uri: str | None


def _shown(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:  # not a URL at all: shown as given
        return url


def sidebar() -> dict[str, list[str]]:
    """Open the store and draw the filters; a UserError says why a store cannot be read."""
    url = settings.store_url()
    options = loaders.filter_options(url)
    with st.sidebar:
        st.caption(f"Results store: `{_shown(url)}`")
        for name, label in FILTERS.items():
            values = STATUSES if name == "status" else options[name]
            key = f"filter_{name}"
            # A value that left the store (a deleted experiment) must leave the selection too.
            if key in st.session_state:
                st.session_state[key] = [v for v in st.session_state[key] if v in values]
            st.multiselect(label, values, key=key, placeholder="all")
        st.checkbox("Include --smoke experiments", key="filter_smoke",
                    help=f"Experiments named *{SMOKE_SUFFIX} (`peftlab run --smoke`) check that every piece runs; "
                         "their numbers are left out unless ticked here or chosen under Experiment.")
        st.button("Reload data", on_click=st.cache_data.clear,
                  help=f"Results are cached for {loaders.TTL} s; reload to see new trials now.")
    return options


def board_label(experiment: str, task: str, model: str) -> str:
    """How a task of an experiment is named in the pages' pickers."""
    return f"{task}  ·  {experiment}  ·  {model}"


def choose(label: str, options: list, key: str, *, index: int = 0, format_func=str, **kwargs):
    """A selectbox whose remembered choice is dropped when the filters remove it from the options."""
    if key in st.session_state and st.session_state[key] not in options:
        del st.session_state[key]
    return st.selectbox(label, options, index=index if options else None, key=key,
                        format_func=format_func, **kwargs)


def context() -> Context:
    filters = Filters(**{name: tuple(st.session_state.get(f"filter_{name}") or ()) for name in FILTERS},
                      smoke=bool(st.session_state.get("filter_smoke")))
    return Context(url=settings.store_url(), filters=filters,
                   tracking_uri=os.environ.get(settings.ENV_TRACKING) or None)


def table(frame: pd.DataFrame, name: str, *, column_config: dict | None = None,
          height: int | str = "auto") -> None:
    """A sortable table and its CSV download (the CSV has every column, unformatted)."""
    st.dataframe(frame, hide_index=True, column_config=column_config, height=height)
    st.download_button("Download CSV", frame.to_csv(index=False).encode(), file_name=f"{name}.csv",
                       mime="text/csv", key=f"csv_{name}", on_click="ignore")


def empty(message: str) -> None:
    st.info(message)


def boards(ctx: Context) -> tuple[pd.DataFrame, list[tuple]] | None:
    """The (experiment, task, model) boards with finished trials under the filters, and their
    keys; None once the empty state is shown."""
    found = loaders.boards(ctx.url, ctx.filters)
    if found.empty:
        no_finished_trials(ctx)
        return None
    return found, [tuple(row) for row in found[list(BOARD)].itertuples(index=False)]


def no_finished_trials(ctx: Context) -> None:
    """The empty state of the comparison pages, with the reasons of failed trials if any."""
    failed = loaders.failures(ctx.url, ctx.filters)
    if failed.empty:
        empty("No finished trial with a result matches the filters yet (completed or early-stopped).")
        return
    n = int(failed["trials"].sum())
    empty(f"No finished trial with a result matches the filters: {n} failed. "
          "Their errors are below; the Trial page shows each one.")
    table(failed, "failed_trials")


def fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or pd.isna(value) else f"{value:.{digits}f}"


def mib(value: float | None) -> float | None:
    return None if value is None or pd.isna(value) else value / MIB
