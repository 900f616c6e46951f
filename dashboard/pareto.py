"""Pareto page: the task metric against trainable parameters, peak memory or train time on a
log axis, per task or across tasks, with the Pareto front drawn and each trial's config on hover."""
from __future__ import annotations

import streamlit as st

from peftlab.dashboard import charts, loaders, widgets

ALL_TASKS = "All tasks: each method's best configuration per task"
COSTS = {"trainable_params": "Trainable parameters", "peak_memory_bytes": "Peak memory",
         "train_seconds": "Train time"}


def render() -> None:
    st.title("Pareto")
    ctx = widgets.context()
    if (found := widgets.boards(ctx)) is None:
        return
    boards, keys = found
    labels = [ALL_TASKS] + [widgets.board_label(*key) for key in keys]
    left, right = st.columns([3, 2])
    with left:
        choice = labels.index(widgets.choose("Task", labels, key="pareto_board", index=1))
    cost = right.radio("Cost", list(COSTS), format_func=COSTS.__getitem__, horizontal=True,
                       key="pareto_cost")
    board = None if not choice else keys[choice - 1]
    points = loaders.pareto(ctx.url, ctx.filters, board, cost)
    if board is None:
        y, y_title, what = "gap", "gap to the task's best method (0 = best)", "task x method results"
        st.caption("Across tasks, each point is a method's best configuration on one task (the "
                   "Leaderboard's rows: mean over seeds, mean costs), and the y axis is the "
                   "normalized score of Methods x domains, so tasks with different metrics compare.")
        columns = ["experiment", "task", "method", "trial_id", "n_seeds", "objective", "gap", cost,
                   "hparams"]
    else:
        row = boards.iloc[choice - 1]
        y, what = "objective", "trials"
        y_title = row["metric"] + (" (lower is better)" if row["mode"] == "min" else "")
        columns = ["experiment", "task", "method", "trial_id", "seed", "status", "objective", "gap",
                   cost, "hparams"]
    plotted = points.loc[points[cost] > 0]
    front = points.loc[points["on_front"]].sort_values(cost)
    st.markdown(f"**{len(front)}** of {len(points)} {what} are on the Pareto front: nothing else "
                f"has both a lower or equal {COSTS[cost].lower()} and a better or equal metric.")
    if len(plotted) < len(points):
        st.caption(f"{len(points) - len(plotted)} point(s) without a recorded "
                   f"{COSTS[cost].lower()} are not plotted.")
    every_method = loaders.filter_options(ctx.url)["method"]  # colours that no filter changes
    st.plotly_chart(charts.pareto(plotted, cost, y, y_title, methods=[*every_method, *plotted["method"]]))
    st.subheader("On the front")
    widgets.table(front[columns], "pareto_front")

if __name__ == "__main__":  # Streamlit runs a page file as __main__
    render()
