"""Trial page: one trial's curves (loss and eval metrics by step), config, costs, error text, and
a link to its MLflow run when the tracking URI is a server."""
from __future__ import annotations

import json

import streamlit as st

from peftlab.dashboard import charts, loaders, widgets


def mlflow_link(tracking_uri: str | None, run_id: str | None) -> str | None:
    """The run's page on an MLflow server (its UI routes /#/runs/ID to the run)."""
    if not run_id or not tracking_uri or not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{tracking_uri.rstrip('/')}/#/runs/{run_id}"


def render() -> None:
    st.title("Trial")
    ctx = widgets.context()
    choices, total = loaders.trial_choices(ctx.url, ctx.filters)
    requested = st.query_params.get("trial", "")
    typed = st.text_input("Trial id", value=requested, key="trial_id",
                          placeholder="paste a trial id, or leave empty to pick one below").strip()
    if typed:
        trial_id = typed
        # Ray's trial ids are unique within one experiment only: ask which one where several hold it.
        holders = loaders.experiments_of(ctx.url, trial_id)
        if not holders:
            st.warning(f"No trial {trial_id!r} in the results store.")
            return
        wanted = st.query_params.get("experiment", "")
        experiment = wanted if wanted in holders else holders[0]
        if len(holders) > 1:
            experiment = widgets.choose(f"Experiment ({len(holders)} hold trial {trial_id})", holders,
                                        key="trial_experiment", index=holders.index(experiment))
    elif choices.empty:
        widgets.empty(widgets.NO_MATCH)
        return
    else:
        labels = {(row.experiment, row.trial_id): f"{row.task} · {row.method} · seed {row.seed} · {row.status} · "
                                                  f"{widgets.fmt(row.objective)} · {row.trial_id} ({row.experiment})"
                  for row in choices.itertuples(index=False)}
        experiment, trial_id = widgets.choose(f"Trial ({len(choices)} of {total} matching, most recent first)",
                                              list(labels), key="trial_pick", format_func=labels.__getitem__)
    row = loaders.trial(ctx.url, experiment, trial_id)
    if row is None:
        st.warning(f"No trial {trial_id!r} in experiment {experiment!r}.")
        return
    st.subheader(f"{row['method']} on {row['task']} · seed {row['seed']} · {row['status']}")
    st.caption(f"{row['experiment']} · model {row['model']} · domain {row['domain']} · "
               f"trial {row['trial_id']} · node {row['node'] or '-'}")
    if row["error"]:
        st.error(f"Failed: {row['error']}")
    tiles = st.columns(5)
    tiles[0].metric(row["metric"], widgets.fmt(row["objective"]),
                    help="validation value at the checkpoint the trial kept (training.select)")
    tiles[1].metric(row["metric"].replace("validation/", "test/", 1), widgets.fmt(row["test_objective"]),
                    help="the same checkpoint on the held-out test split, scored once at the trial's end")
    tiles[2].metric("Trainable params", "-" if row["trainable_params"] is None
                    else f"{row['trainable_params']:,}")
    tiles[3].metric("Trainable %", widgets.fmt(row["trainable_pct"], 3))
    tiles[4].metric("Adapter", "-" if row["adapter_bytes"] is None
                    else f"{widgets.mib(row['adapter_bytes']):.2f} MiB")
    tiles = st.columns(4)
    tiles[0].metric("Peak memory", "-" if row["peak_memory_bytes"] is None
                    else f"{widgets.mib(row['peak_memory_bytes']):.0f} MiB")
    tiles[1].metric("Train time", "-" if row["train_seconds"] is None else f"{row['train_seconds']:.1f} s")
    tiles[2].metric("Samples/s", widgets.fmt(row["samples_per_second"], 1))
    tiles[3].metric("Steps", "-" if row["steps"] is None else str(row["steps"]))
    link = mlflow_link(ctx.tracking_uri, row["mlflow_run_id"])
    if link:
        st.markdown(f"[Open this run in MLflow]({link})")
    elif row["mlflow_run_id"]:
        where = f" with `mlflow ui --backend-store-uri {ctx.tracking_uri}`" if ctx.tracking_uri else ""
        st.caption(f"MLflow run `{row['mlflow_run_id']}`: open it{where}.")
    points = loaders.curves(ctx.url, experiment, trial_id)
    if points.empty:
        widgets.empty("No metric curve recorded for this trial.")
    else:
        loss = points["name"].str.contains("loss")
        left, right = st.columns(2)
        if loss.any():
            left.plotly_chart(charts.curves(points.loc[loss], "Loss by step"), key="curve_loss")
        if (~loss).any():
            right.plotly_chart(charts.curves(points.loc[~loss], "Eval metrics by step"),
                               key="curve_eval")
        widgets.table(points.pivot_table(index="step", columns="name", values="value",
                                         dropna=False).reset_index(), "curves")
    st.subheader("Config")
    st.json(json.loads(row["hparams"] or "{}"))


if __name__ == "__main__":  # Streamlit runs a page file as __main__
    render()
