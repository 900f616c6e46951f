"""Sensitivity page: per method and task, parallel coordinates of hyperparameters vs metric and
the metric against each hyperparameter (learning rate on a log axis); early-stopped trials marked."""
from __future__ import annotations

import streamlit as st

from peftlab.dashboard import charts, loaders, widgets


def render() -> None:
    st.title("Sensitivity")
    ctx = widgets.context()
    if (found := widgets.boards(ctx)) is None:
        return
    boards, keys = found
    labels = [widgets.board_label(*key) for key in keys]
    left, right = st.columns(2)
    with left:
        choice = labels.index(widgets.choose("Task", labels, key="sensitivity_board"))
    board, metric = keys[choice], boards.iloc[choice]["metric"]
    methods = loaders.methods_on(ctx.url, ctx.filters, board)
    with right:
        method = widgets.choose("Method", methods, key="sensitivity_method")
    frame = loaders.sensitivity(ctx.url, ctx.filters, board, method)
    hparams = [c.removeprefix("hp:") for c in frame.columns if c.startswith("hp:")]
    varying = [h for h in hparams if frame[f"hp:{h}"].map(str).nunique() > 1]
    stopped = int((frame["status"] == "EARLY_STOPPED").sum())
    best = frame.loc[frame["score"].idxmax(), "objective"]
    st.markdown(f"**{method}** on {board[1]}: **{len(frame)}** finished trial(s), {stopped} "
                f"early-stopped (shown as open markers); best {metric} **{widgets.fmt(best)}**.")
    if not varying:
        widgets.empty(f"Every {method} trial here has the same hyperparameters "
                      f"({', '.join(hparams) or 'none'}): nothing to compare.")
    else:
        st.plotly_chart(charts.parallel(frame, varying, metric))
        columns = st.columns(2)
        for i, hparam in enumerate(varying):
            columns[i % 2].plotly_chart(charts.sensitivity_scatter(frame, hparam, metric),
                                        key=f"sensitivity_{hparam}")
    widgets.table(frame.drop(columns="score").map(lambda v: str(v) if isinstance(v, list | dict) else v),
                  "sensitivity_trials")


if __name__ == "__main__":  # Streamlit runs a page file as __main__
    render()
