"""Bias page: per task, the test score against a bias score of each trial's kept checkpoint,
coloured by method, with the untouched model's score and the unbiased point as reference lines."""
from __future__ import annotations

import streamlit as st

from peftlab.dashboard import charts, loaders, stats, widgets
from peftlab.store import test_metric

NO_SCORES = ("No bias scores in these trials: add `bias_eval: [crows_pairs, winobias, bbq]` to a task "
             "of the spec and run it.")
MEANINGS = {  # name prefix -> what the number is
    "crows_pairs": "% of CrowS-Pairs pairs where the stereotypical sentence is the more likely",
    "winobias_pro_percent": "% of WinoBias pairs where the pro-stereotyped sentence is the more likely",
    "winobias": "mean log-likelihood of the pro-stereotyped minus the anti-stereotyped WinoBias sentence",
    "bbq_bias": "BBQ bias score, from -1 to 1",
    "bbq_accuracy": "BBQ accuracy",
}
DEFINITIONS = (
    "Each point is a finished trial: its test score and the bias score of the checkpoint it kept. "
    "Diamonds: each method's mean over its trials (every configuration and seed) with 95% bootstrap "
    "CIs. Solid line: the same score of the model before the method was applied (mean over the "
    "trials); dashed line: unbiased. change = bias - base; toward unbiased = |base - unbiased| - "
    "|bias - unbiased| (above 0: less biased than the base model)."
)
COLUMNS = {
    **{f"{c}_{s}": st.column_config.NumberColumn(f"{c} {s.replace('_', ' ')}", format="%.4f")
       for c in ("test", "bias") for s in ("mean", "ci_lo", "ci_hi")},
    "change_mean": st.column_config.NumberColumn("change from base", format="%+.4f"),
    "change_ci_lo": st.column_config.NumberColumn("change CI lo", format="%+.4f"),
    "change_ci_hi": st.column_config.NumberColumn("change CI hi", format="%+.4f"),
    "base_mean": st.column_config.NumberColumn("base mean", format="%.4f"),
    "toward_unbiased": st.column_config.NumberColumn("toward unbiased", format="%+.4f"),
}


def meaning(name: str) -> str:
    point = stats.unbiased(name)
    what = next((text for prefix, text in MEANINGS.items() if name.startswith(prefix)), name)
    return what + ("" if point is None else f"; {point:g} = unbiased")


def render() -> None:
    st.title("Bias")
    ctx = widgets.context()
    if (found := widgets.boards(ctx)) is None:
        return
    boards, keys = found
    scored = {key: names for key, names in loaders.bias_boards(ctx.url, ctx.filters).items() if key in keys}
    if not scored:
        widgets.empty(NO_SCORES)
        return
    labels = {widgets.board_label(*key): key for key in scored}
    left, right = st.columns([3, 2])
    with left:
        board = labels[widgets.choose("Task", list(labels), key="bias_board")]
    with right:
        name = widgets.choose("Bias score", scored[board], key="bias_metric",
                              help="Scores the trials of this task carry, overall scores first.")
    row = boards.iloc[keys.index(board)]
    trials, summary, base = loaders.bias_board(ctx.url, ctx.filters, board, name)
    point = stats.unbiased(name)
    if not base["n"]:
        reference = ("no base model score was recorded" + (
            " (BBQ reads answers through the task's new head, which the untouched model has only at its "
            "random start)" if name.startswith("bbq") else ""))
    else:
        reference = f"the untouched model scores **{widgets.fmt(base['mean'])}** (mean over {base['n']} trial(s)"
        reference += (f"; it differs across trials: {widgets.fmt(base['lo'])} to {widgets.fmt(base['hi'])})"
                      if base["differs"] else ")")
    st.markdown(f"**{len(trials)}** of {int(row['trials'])} finished trial(s) on {board[1]} have "
                f"`bias/{name}` ({meaning(name)}); {reference}.")
    y_title = test_metric(row["metric"]) + (" (lower is better)" if row["mode"] == "min" else "")
    every_method = loaders.filter_options(ctx.url)["method"]  # colours that no filter changes
    st.plotly_chart(charts.bias_scatter(trials, summary, x_title=f"bias/{name} of the kept checkpoint",
                                        y_title=y_title, base=base, unbiased=point,
                                        methods=[*every_method, *trials["method"]]))
    st.caption(DEFINITIONS)
    st.subheader("Per method")
    shown = summary if point is not None else summary.drop(columns="toward_unbiased")
    widgets.table(shown, "bias_methods", column_config=COLUMNS)
    st.subheader("Trials")
    widgets.table(trials, "bias_trials", column_config={
        "test_objective": st.column_config.NumberColumn(y_title, format="%.4f"),
        "bias": st.column_config.NumberColumn(f"bias/{name}", format="%.4f"),
        "base": st.column_config.NumberColumn(f"bias_base/{name}", format="%.4f"),
        "change": st.column_config.NumberColumn("change", format="%+.4f")})


if __name__ == "__main__":  # Streamlit runs a page file as __main__
    render()
