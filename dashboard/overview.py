"""Overview page: every experiment with its status, trial counts by status, time span, models
and domains."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from peftlab.dashboard import charts, loaders, widgets
from peftlab.dashboard.queries import STATUSES


def render() -> None:
    st.title("Overview")
    ctx = widgets.context()
    frame = loaders.overview(ctx.url, ctx.filters)
    if frame.empty:
        widgets.empty(widgets.NO_MATCH)
        return
    counts = [s.lower() for s in STATUSES]
    totals = frame[["trials", *counts]].sum()
    tiles = st.columns(6)
    tiles[0].metric("Experiments", len(frame))
    tiles[1].metric("Trials", int(totals["trials"]))
    tiles[2].metric("Completed", int(totals["completed"]))
    tiles[3].metric("Early-stopped", int(totals["early_stopped"]))
    tiles[4].metric("Failed", int(totals["failed"]))
    tiles[5].metric("Running or pending", int(totals["running"] + totals["pending"]))
    if totals["trials"]:
        st.plotly_chart(charts.status_bars(frame, STATUSES))
    else:
        widgets.empty("No trial has started yet.")
    shown = frame.assign(
        first_started=pd.to_datetime(frame["first_started"], utc=True),
        last_finished=pd.to_datetime(frame["last_finished"], utc=True),
    )
    shown.insert(shown.columns.get_loc("last_finished") + 1, "span_minutes",
                 (shown["last_finished"] - shown["first_started"]).dt.total_seconds() / 60)
    widgets.table(shown, "experiments", column_config={
        "span_minutes": st.column_config.NumberColumn("span (min)", format="%.1f"),
        "created_at": st.column_config.DatetimeColumn("created", format="YYYY-MM-DD HH:mm"),
        "first_started": st.column_config.DatetimeColumn("first started", format="YYYY-MM-DD HH:mm"),
        "last_finished": st.column_config.DatetimeColumn("last finished", format="YYYY-MM-DD HH:mm"),
    })


if __name__ == "__main__":  # Streamlit runs a page file as __main__
    render()
