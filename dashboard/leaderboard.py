"""Leaderboard page: per task, each method's best configuration with mean and 95% bootstrap CI
over seeds and its costs; the winner and the methods tied with it are marked."""
from __future__ import annotations

from urllib.parse import quote

import pandas as pd
import streamlit as st

from peftlab.dashboard import charts, loaders, widgets
from peftlab.dashboard.queries import BOARD

DEFINITIONS = (
    "Best configuration per method = the hyperparameters with the best mean over seeds "
    "(finished trials: completed or early-stopped). CI = 95% percentile bootstrap of that mean "
    "(2,000 resamples, fixed seed; one seed gives a single point). **Winner** = best mean; "
    "**tied** = its CI overlaps the winner's, i.e. the data do not separate them."
)


def shown(summary: pd.DataFrame) -> pd.DataFrame:
    """The table as displayed and downloaded: sizes in MiB, a link to each best trial."""
    return pd.DataFrame({
        **{c: summary[c] for c in (*BOARD, "domain", "method", "verdict", "rank", "metric", "mode")},
        "mean": summary["mean"], "ci_lo": summary["ci_lo"], "ci_hi": summary["ci_hi"],
        "n_seeds": summary["n_seeds"], "n_configs": summary["n_configs"],
        "n_trials": summary["n_trials"],
        "trainable_params": summary["trainable_params"], "trainable_pct": summary["trainable_pct"],
        "adapter_mib": summary["adapter_bytes"] / widgets.MIB,
        "peak_memory_mib": summary["peak_memory_bytes"] / widgets.MIB,
        "train_seconds": summary["train_seconds"], "samples_per_second": summary["samples_per_second"],
        "hparams": summary["hparams"], "best_trial": summary["best_trial"],
        "open": "trial?experiment=" + summary["experiment"].map(quote) + "&trial=" + summary["best_trial"],
    })


COLUMNS = {
    "mean": st.column_config.NumberColumn("mean", format="%.4f"),
    "ci_lo": st.column_config.NumberColumn("CI low", format="%.4f"),
    "ci_hi": st.column_config.NumberColumn("CI high", format="%.4f"),
    "rank": st.column_config.NumberColumn("rank", format="%.1f"),
    "trainable_params": st.column_config.NumberColumn("trainable params", format="localized"),
    "trainable_pct": st.column_config.NumberColumn("trainable %", format="%.4f"),
    "adapter_mib": st.column_config.NumberColumn("adapter MiB", format="%.2f"),
    "peak_memory_mib": st.column_config.NumberColumn("peak memory MiB", format="%.0f"),
    "train_seconds": st.column_config.NumberColumn("train s", format="%.1f"),
    "samples_per_second": st.column_config.NumberColumn("samples/s", format="%.1f"),
    "open": st.column_config.LinkColumn("trial", display_text="open"),
}


def render() -> None:
    st.title("Leaderboard")
    ctx = widgets.context()
    summary = loaders.leaderboard(ctx.url, ctx.filters)
    if summary.empty:
        widgets.no_finished_trials(ctx)
        return
    st.caption(DEFINITIONS)
    labels = summary.apply(lambda r: widgets.board_label(r["experiment"], r["task"], r["model"]), axis=1)
    choice = widgets.choose("Task", list(dict.fromkeys(labels)), key="leaderboard_board")
    board = summary.loc[labels == choice]
    winner = board.loc[board["verdict"] == "winner"].iloc[0]
    tied = board.loc[board["verdict"] == "tied", "method"].tolist()
    st.markdown(
        f"**Winner on {winner['task']}: {winner['method']}**, {winner['metric']} "
        f"**{widgets.fmt(winner['mean'])}** (95% CI {widgets.fmt(winner['ci_lo'])} to "
        f"{widgets.fmt(winner['ci_hi'])}, {int(winner['n_seeds'])} seed(s)). "
        + (f"Tied with it: {', '.join(tied)}." if tied else "No other method is tied with it.")
    )
    st.plotly_chart(charts.leaderboard_ci(board, winner["metric"]))
    st.subheader("Every task")
    widgets.table(shown(summary), "leaderboard", column_config=COLUMNS)


if __name__ == "__main__":  # Streamlit runs a page file as __main__
    render()
