"""Methods x domains page: each method's normalized score per domain as a heat map, with the
number of tasks behind each cell, and each method's average rank across tasks."""
from __future__ import annotations

import streamlit as st

from peftlab.dashboard import charts, loaders, widgets

DEFINITIONS = (
    "Normalized score = the method's mean (its best configuration, averaged over seeds) minus "
    "the best method's mean on the same task, in the metric's units and signed so that 0 is the "
    "best and below 0 is worse (for a loss, higher is worse). A cell averages its domain's "
    "tasks. Rank 1 = best mean on a task; equal means share the average rank."
)


def render() -> None:
    st.title("Methods x domains")
    ctx = widgets.context()
    matrix = loaders.domain_matrix(ctx.url, ctx.filters)
    if matrix is None:
        widgets.no_finished_trials(ctx)
        return
    score, tasks, ranks = matrix
    st.caption(DEFINITIONS)
    best = ranks.iloc[0]
    st.markdown(f"Best average rank: **{best['method']}**, **{best['average_rank']:.2f}** over "
                f"{int(best['tasks'])} task(s) in {score.shape[1]} domain(s).")
    st.plotly_chart(charts.domain_heatmap(score, tasks))
    st.subheader("Average rank per method")
    widgets.table(ranks, "average_ranks", column_config={
        c: st.column_config.NumberColumn(c, format="%.2f") for c in ranks.columns if "rank" in c})
    st.subheader("Cells")
    cells = (score.stack().rename("normalized").to_frame()
             .join(tasks.stack().rename("tasks")).dropna(subset=["normalized"]).reset_index())
    widgets.table(cells, "domain_scores", column_config={
        "normalized": st.column_config.NumberColumn("normalized score", format="%+.4f")})


if __name__ == "__main__":  # Streamlit runs a page file as __main__
    render()
