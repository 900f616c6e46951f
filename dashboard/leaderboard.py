"""Leaderboard page: per task, each method's best configuration (chosen on validation) with its
test mean and 95% bootstrap CI over seeds and its costs, and each method's verdict against the best
from a paired test on test scores."""
from __future__ import annotations

from urllib.parse import quote

import pandas as pd
import streamlit as st

from peftlab.dashboard import charts, loaders, stats, widgets
from peftlab.dashboard.queries import BOARD
from peftlab.store import test_metric

DEFINITIONS = (
    "Best configuration per method = the hyperparameters with the best **validation** mean over "
    "seeds (finished trials: completed or early-stopped). Every other number is on the held-out "
    "**test** split, scored once per trial at the checkpoint it kept: mean, CI = 95% percentile "
    "bootstrap of that mean (2,000 resamples, fixed seed; one seed gives a single point), ranks. "
    "A trial from a store made before test splits has no test score (shown empty). **best** = "
    "best test mean. Every "
    f"other method against it: {stats.TEST} (on the seeds both ran, which saw the same data "
    f"order); **worse** = corrected p < {stats.ALPHA}, **tied** = not separated, **untested** = "
    "fewer than two shared seeds."
)


def verdict_line(board: pd.DataFrame) -> str:
    """One board's best method and how every other one compares with it, in words."""
    best = board.loc[board["verdict"] == "best"].iloc[0]
    line = (f"**Best on {best['task']}: {best['method']}**, test {best['metric'].split('/', 1)[-1]} "
            f"**{widgets.fmt(best['mean'])}** (validation {widgets.fmt(best['validation_mean'])}) "
            f"(95% CI {widgets.fmt(best['ci_lo'])} to {widgets.fmt(best['ci_hi'])}, {int(best['n_seeds'])} seed(s)). ")
    others = board.loc[board.index != best.name]
    if others.empty:
        return line + "No other method ran."
    if (others["verdict"] == "untested").all():
        return line + ("Ties cannot be judged: no other method shares two seeds with it (one seed each "
                       "gives one number per method); re-run the best configurations with `training.seeds`.")
    tested = others.loc[others["verdict"] != "untested"]
    seeds = sorted(set(tested["n_paired"].astype(int)))
    parts = [f"By a {stats.TEST} ({'/'.join(map(str, seeds))} paired seeds):"]
    for verdict, label in (("tied", "tied with it"), ("worse", "worse")):
        names = tested.loc[tested["verdict"] == verdict, "method"].tolist()
        parts.append(f"{label}: {', '.join(names) if names else 'none'};")
    untested = others.loc[others["verdict"] == "untested", "method"].tolist()
    if untested:
        parts.append(f"untested (fewer than two shared seeds): {', '.join(untested)};")
    return line + " ".join(parts).rstrip(";") + "."


def shown(summary: pd.DataFrame) -> pd.DataFrame:
    """The table as displayed and downloaded: sizes in MiB, a link to each best trial."""
    return pd.DataFrame({
        **{c: summary[c] for c in (*BOARD, "domain", "method", "verdict", "n_paired", "p_holm", "rank", "metric",
                                   "mode")},
        "validation_mean": summary["validation_mean"],
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
    "validation_mean": st.column_config.NumberColumn("validation mean", format="%.4f"),
    "mean": st.column_config.NumberColumn("test mean", format="%.4f"),
    "ci_lo": st.column_config.NumberColumn("CI low", format="%.4f"),
    "ci_hi": st.column_config.NumberColumn("CI high", format="%.4f"),
    "rank": st.column_config.NumberColumn("rank", format="%.1f"),
    "n_paired": st.column_config.NumberColumn("paired seeds"),
    "p_holm": st.column_config.NumberColumn("p (Holm)", format="%.3g"),
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
    st.markdown(verdict_line(board))
    st.plotly_chart(charts.leaderboard_ci(board, test_metric(board["metric"].iloc[0])))
    st.subheader("Every task")
    widgets.table(shown(summary), "leaderboard", column_config=COLUMNS)


if __name__ == "__main__":  # Streamlit runs a page file as __main__
    render()
