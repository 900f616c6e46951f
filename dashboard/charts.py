"""Plotly figures for the pages: each function takes an already-reduced DataFrame and returns
a figure; none reads the store or touches Streamlit.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

STATUS_COLORS = {"COMPLETED": "#2e8b57", "EARLY_STOPPED": "#e69f00", "FAILED": "#d62728",
                 "RUNNING": "#1f77b4", "PENDING": "#999999"}
VERDICT_COLORS = {"best": "#2e8b57", "tied": "#e69f00", "worse": "#7f7f7f", "untested": "#56b4e9"}
COSTS = {"trainable_params": "trainable parameters", "peak_memory_bytes": "peak memory (bytes)",
         "train_seconds": "train time (s)"}


def method_colors(methods) -> dict[str, str]:
    """One colour per method, the same on every chart: plotly's 10 while they suffice, then the
    26 of its Alphabet set, then evenly spaced along Turbo, so no two methods share a colour."""
    names = sorted(set(methods))
    if len(names) <= len(px.colors.qualitative.Plotly):
        palette = px.colors.qualitative.Plotly
    elif len(names) <= len(px.colors.qualitative.Alphabet):
        palette = px.colors.qualitative.Alphabet
    else:
        palette = px.colors.sample_colorscale("Turbo", [i / (len(names) - 1) for i in range(len(names))])
    return dict(zip(names, palette, strict=False))


def _tidy(fig: go.Figure, height: int = 420) -> go.Figure:
    fig.update_layout(height=height, margin=dict(l=10, r=10, t=40, b=10), legend_title_text="")
    return fig


def status_bars(overview: pd.DataFrame, statuses: list[str]) -> go.Figure:
    """Trials per experiment, stacked by status."""
    counts = [s.lower() for s in statuses]
    long = overview[["experiment", *counts]].melt(id_vars="experiment", var_name="status",
                                                  value_name="trials")
    long["status"] = long["status"].str.upper()
    fig = px.bar(long, x="experiment", y="trials", color="status", color_discrete_map=STATUS_COLORS,
                 title="Trials by status")
    return _tidy(fig, 360)


def leaderboard_ci(board: pd.DataFrame, metric: str) -> go.Figure:
    """Each method's best configuration: its test mean with the 95% bootstrap interval, best first
    (`metric`: the test metric's name, the axis title)."""
    fig = go.Figure()
    for verdict, rows in board.groupby("verdict", sort=False):
        fig.add_trace(go.Scatter(
            x=rows["method"], y=rows["mean"], mode="markers", name=verdict,
            marker=dict(size=11, color=VERDICT_COLORS.get(verdict, "#7f7f7f")),
            error_y=dict(type="data", array=rows["ci_hi"] - rows["mean"],
                         arrayminus=rows["mean"] - rows["ci_lo"]),
            customdata=np.stack([rows["ci_lo"], rows["ci_hi"], rows["n_seeds"]], axis=-1),
            hovertemplate="%{x}: %{y:.4f}<br>95% CI %{customdata[0]:.4f} to %{customdata[1]:.4f}"
                          "<br>%{customdata[2]} seed(s)<extra></extra>",
        ))
    fig.update_xaxes(categoryorder="array", categoryarray=list(board["method"]))
    fig.update_layout(title="Best configuration per method: test mean and 95% CI over seeds",
                      yaxis_title=metric)
    return _tidy(fig, 380)


def domain_heatmap(score: pd.DataFrame, tasks: pd.DataFrame) -> go.Figure:
    """Normalized score per method x domain, the number of tasks written in each cell."""
    text = [[("" if pd.isna(v) else f"{v:+.4f}<br>{n} task{'s' if n != 1 else ''}")
             for v, n in zip(srow, trow, strict=True)]
            for srow, trow in zip(score.to_numpy(), tasks.to_numpy(), strict=True)]
    fig = go.Figure(go.Heatmap(
        z=score.to_numpy(), x=list(score.columns), y=list(score.index), text=text,
        texttemplate="%{text}", colorscale="RdYlGn", zmax=0,
        colorbar=dict(title="gap to best"),
        hovertemplate="%{y} on %{x}: %{z:+.4f}<extra></extra>",
    ))
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title="Difference to the best method on each task, averaged per domain")
    return _tidy(fig, max(300, 60 * len(score.index) + 120))


def pareto(points: pd.DataFrame, cost: str, y: str, y_title: str, methods=None) -> go.Figure:
    """Points on log(cost) vs metric, coloured by method, the Pareto front as a staircase.
    Trials (with a status: early-stopped ones open) or per-task method summaries (without).
    `methods`: every method the colours are assigned over (default: those shown), so that a
    filter does not recolour the others."""
    hover = {"task": True, "trial_id": True, "hparams": True, "objective": ":.4f", cost: True}
    if "status" in points:
        shown = points.assign(status=points["status"].map(
            {"EARLY_STOPPED": "early-stopped", "COMPLETED": "completed"}))
        symbols = dict(symbol="status", symbol_map={"completed": "circle", "early-stopped": "circle-open"})
        hover["seed"] = True
    else:
        shown, symbols = points, {}
        hover["n_seeds"] = True
    colors = method_colors(shown["method"] if methods is None else methods)
    fig = px.scatter(shown, x=cost, y=y, color="method", color_discrete_map=colors, log_x=True,
                     hover_data=hover, **symbols)
    fig.update_traces(marker=dict(size=10, line=dict(width=2)))  # open markers need a visible ring
    front = points.loc[points["on_front"]].sort_values(cost)
    fig.add_trace(go.Scatter(x=front[cost], y=front[y], mode="lines", line_shape="hv",
                             name="Pareto front", line=dict(color="black", width=1.5, dash="dot"),
                             hoverinfo="skip"))
    fig.update_layout(title=f"{y_title} vs {COSTS[cost]} (log axis)", xaxis_title=COSTS[cost],
                      yaxis_title=y_title)
    return _tidy(fig, 480)


def _dimension(values: pd.Series, label: str) -> dict:
    """A parallel-coordinates axis: numeric as is (lr as log10), anything else as categories."""
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.notna().all() and values.map(lambda v: not isinstance(v, bool)).all():
        if is_log_scale(label) and (numeric > 0).all():
            return dict(label=f"log10({label})", values=np.log10(numeric))
        return dict(label=label, values=numeric)
    text = values.map(str)
    categories = sorted(text.unique())
    codes = text.map({c: i for i, c in enumerate(categories)})
    return dict(label=label, values=codes, tickvals=list(range(len(categories))), ticktext=categories)


def is_log_scale(name: str) -> bool:
    """Learning rates (and weight decay) span decades: they get log axes."""
    return name in ("lr", "learning_rate", "weight_decay") or name.endswith("_lr")


def parallel(frame: pd.DataFrame, hparams: list[str], metric: str) -> go.Figure:
    """One line per trial through its hyperparameters, early-stopped or not, and its metric."""
    dims = [_dimension(frame[f"hp:{name}"], name) for name in hparams]
    stopped = (frame["status"] == "EARLY_STOPPED").astype(int)
    dims.append(dict(label="status", values=stopped, tickvals=[0, 1],
                     ticktext=["completed", "early-stopped"]))
    dims.append(dict(label=metric, values=frame["objective"]))
    fig = go.Figure(go.Parcoords(
        line=dict(color=frame["objective"], colorscale="Viridis", showscale=True,
                  colorbar=dict(title=metric)),
        dimensions=dims,
    ))
    fig.update_layout(title="Hyperparameters and metric, one line per trial")
    _tidy(fig, 460)
    # Axis names sit above the axes and the outer axes' tick labels beside them: room for both,
    # below the title.
    fig.update_layout(margin=dict(l=80, r=80, t=110, b=30))
    return fig


def sensitivity_scatter(frame: pd.DataFrame, hparam: str, metric: str) -> go.Figure:
    """Metric against one hyperparameter; early-stopped trials as open markers."""
    column = f"hp:{hparam}"
    values = frame[column]
    numeric = pd.to_numeric(values, errors="coerce")
    is_numeric = numeric.notna().all() and values.map(lambda v: not isinstance(v, bool)).all()
    shown = frame.assign(**{column: numeric if is_numeric else values.map(str)},
                         status=frame["status"].map({"EARLY_STOPPED": "early-stopped",
                                                     "COMPLETED": "completed"}))
    log = is_numeric and is_log_scale(hparam) and bool((numeric > 0).all())
    fig = px.scatter(shown, x=column, y="objective", color="status", symbol="status", log_x=log,
                     color_discrete_map={"completed": STATUS_COLORS["COMPLETED"],
                                         "early-stopped": STATUS_COLORS["EARLY_STOPPED"]},
                     symbol_map={"completed": "circle", "early-stopped": "circle-open"},
                     hover_data={"trial_id": True, "seed": True})
    fig.update_traces(marker=dict(size=9, line=dict(width=2)))
    fig.update_layout(title=f"{metric} vs {hparam}{' (log axis)' if log else ''}",
                      xaxis_title=hparam, yaxis_title=metric)
    return _tidy(fig, 340)


def curves(points: pd.DataFrame, title: str) -> go.Figure:
    """Metric curves by step, one line per metric name."""
    fig = px.line(points, x="step", y="value", color="name", markers=True, title=title)
    return _tidy(fig, 340)


def _reach(mean, lo, hi) -> dict:
    """A one-point error bar from a mean and its interval (none where the interval is a point)."""
    return dict(type="data", array=[hi - mean], arrayminus=[mean - lo], visible=bool(hi > lo), thickness=1.5)


def bias_scatter(trials: pd.DataFrame, summary: pd.DataFrame, *, x_title: str, y_title: str,
                 base: dict, unbiased: float | None, methods=None) -> go.Figure:
    """Test score against a bias score, one point per trial coloured by method, each method's
    mean as a diamond with its CIs on both axes; the base model's score as a solid vertical line
    (`base`: stats.base_reference) and the unbiased point, where there is one, as a dashed one.
    `methods`: every method the colours are assigned over (default: those shown)."""
    colors = method_colors(trials["method"] if methods is None else methods)
    fig = px.scatter(trials, x="bias", y="test_objective", color="method", color_discrete_map=colors,
                     hover_data={"trial_id": True, "seed": True, "bias": ":.4f", "base": ":.4f",
                                 "change": ":+.4f", "test_objective": ":.4f", "hparams": True})
    fig.update_traces(marker=dict(size=9, opacity=0.75))
    for row in summary.itertuples(index=False):
        fig.add_trace(go.Scatter(
            x=[row.bias_mean], y=[row.test_mean], mode="markers", name=f"{row.method} mean",
            legendgroup=row.method, showlegend=False,
            marker=dict(symbol="diamond", size=15, color=colors[row.method], line=dict(width=1.5, color="black")),
            error_x=_reach(row.bias_mean, row.bias_ci_lo, row.bias_ci_hi),
            error_y=_reach(row.test_mean, row.test_ci_lo, row.test_ci_hi),
            hovertemplate=(f"{row.method} mean over {row.trials} trial(s): bias %{{x:.4f}} "
                           f"(95% CI {row.bias_ci_lo:.4f} to {row.bias_ci_hi:.4f}), test %{{y:.4f}}<extra></extra>"),
        ))
    if base["n"]:
        spread = (f"; differs across trials: {base['lo']:.4g} to {base['hi']:.4g}" if base["differs"]
                  else "; the same in every trial")
        fig.add_vline(x=base["mean"], line=dict(color="#444444", width=2),
                      annotation=dict(text=f"base model {base['mean']:.4g}", textangle=0,
                                      hovertext=f"untouched model: mean {base['mean']:.4f} over {base['n']} trial(s){spread}"),
                      annotation_position="top right")
    if unbiased is not None:
        fig.add_vline(x=unbiased, line=dict(color="#2e8b57", width=2, dash="dash"),
                      annotation=dict(text=f"unbiased {unbiased:g}"), annotation_position="bottom right")
    fig.update_layout(title=f"{y_title} vs {x_title}", xaxis_title=x_title, yaxis_title=y_title)
    return _tidy(fig, 480)
