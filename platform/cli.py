"""The `peftlab` command line: validate, run, results, methods, migrate.

Every user error ends in one line on stderr and exit code 2; a sweep exits 0 when at
least one trial finished and 1 when all failed.
"""
from __future__ import annotations

import csv
import functools
import io
import json
import math
import sys
from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from peftlab import settings
from peftlab.errors import UserError

app = typer.Typer(help="peftlab: compare PEFT methods with Ray Tune, MLflow and a SQL results store.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, soft_wrap=True)


class Format(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"
    markdown = "markdown"


def user_errors(command):
    """Turn a UserError into one line on stderr and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as exc:
            err_console.print(f"error: {exc}", markup=False, highlight=False)
            raise typer.Exit(2) from None

    return wrapper


SpecArg = Annotated[Path, typer.Argument(help="The experiment's YAML spec.")]
StoreOpt = Annotated[Optional[str], typer.Option("--store", help="Results store URL (else $PEFTLAB_STORE_URL, else ./peftlab-runs/results.db).")]
AddressOpt = Annotated[Optional[str], typer.Option("--address", help="Ray cluster address (else $RAY_ADDRESS, else a local instance).")]
TrackingOpt = Annotated[Optional[str], typer.Option("--tracking-uri", help="MLflow tracking URI (else $MLFLOW_TRACKING_URI, else ./peftlab-runs/mlflow.db).")]


def _plan_table(spec, sizes: dict | None = None) -> Table:
    from peftlab.search import describe_leaves, plan

    table = Table(title=f"{spec.name}: trial plan", title_justify="left")
    for column in ("task", "domain", "model", "metric", "method", "search space", "trials"):
        table.add_column(column, overflow="fold")
    for task_plan in plan(spec, sizes):
        task = task_plan.task
        for method, space in task_plan.spaces.items():
            if task_plan.configs is not None:
                count = str(sum(1 for c in task_plan.configs if c["method"] == method))
            else:
                count = "chosen by TPE"
            table.add_row(task.label, task.domain or "-", spec.model_for(task), f"{task_plan.metric} ({task_plan.mode})",
                          method, describe_leaves(space.leaves), count)
        reruns = f"; then each method's best with seeds {spec.final_seeds}" if spec.final_seeds else ""
        table.add_row("", "", "", "", "[bold]total[/]", f"{spec.search.algorithm} search, {spec.search.scheduler} "
                      f"scheduler, seeds {spec.training.seeds}{reruns}", f"[bold]{task_plan.num_trials}[/]")
    return table


@app.command()
@user_errors
def validate(
    spec_path: SpecArg,
    strict: Annotated[bool, typer.Option("--strict", help="Refuse the spec (exit 2) on any data warning.")] = False,
) -> None:
    """Check a spec (data, model, methods), print each task's splits and the trial plan; exit 2 on
    error, and with --strict on a data warning too."""
    from peftlab.driver import preflight, sizes_of
    from peftlab.progress import budget_table, splits_table
    from peftlab.spec import load_spec

    spec = load_spec(spec_path)
    reports: list = []
    fits = preflight(spec, source=str(spec_path), data_reports=reports)
    console.print(splits_table([summary for summaries, _ in reports for summary in summaries]))
    warnings = [line for _, lines in reports for line in lines]
    for line in warnings:
        console.print(f"[yellow]warning[/]: {line}")
    if fits:
        console.print(budget_table(fits))
    console.print(_plan_table(spec, sizes_of(fits)))
    if strict and warnings:
        raise UserError(f"{len(warnings)} data warning(s) and --strict: {warnings[0]}")
    console.print(f"[green]ok[/]: {spec_path} is valid")


@app.command()
@user_errors
def run(
    spec_path: SpecArg,
    address: AddressOpt = None,
    store: StoreOpt = None,
    tracking_uri: TrackingOpt = None,
    smoke: Annotated[bool, typer.Option("--smoke", help="Shrink steps, samples and seeds for a quick end-to-end check.")] = False,
) -> None:
    """Run a sweep: live progress, then the leaderboard."""
    from peftlab.driver import run_sweep
    from peftlab.driver import smoke as shrink
    from peftlab.spec import load_spec

    spec = load_spec(spec_path)
    if smoke:
        spec = shrink(spec)
    console.print(_plan_table(spec))
    _finish(lambda: run_sweep(spec, address=address, store_url=store, tracking_uri=tracking_uri,
                              console=console, source=str(spec_path)), spec.name, store)


@app.command()
@user_errors
def resume(
    name: Annotated[str, typer.Argument(help="Name of the interrupted experiment.")],
    address: AddressOpt = None,
    store: StoreOpt = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Continue an interrupted sweep where it stopped."""
    from peftlab.driver import resume_sweep

    _finish(lambda: resume_sweep(name, address=address, store_url=store, tracking_uri=tracking_uri,
                                 console=console), name, store)


def _finish(sweep, name: str, store: str | None) -> None:
    """Run a sweep, print its leaderboard; exit 1 if every trial failed, 130 if interrupted."""
    from peftlab.progress import leaderboard_table

    from peftlab.driver import TERMINATED, interrupt_on_sigterm

    interrupt_on_sigterm()
    try:
        outcome = sweep()
    except KeyboardInterrupt:
        err_console.print(f"interrupted: continue with `peftlab resume {name}`")
        raise typer.Exit(143 if TERMINATED else 130) from None
    console.print(leaderboard_table(outcome.leaderboard))
    counts = ", ".join(f"{n} {status.lower()}" for status, n in sorted(outcome.counts.items()))
    console.print(f"{outcome.experiment}: {counts or 'no trials'}; results in {settings.store_url(store)}")
    if not outcome.succeeded:
        err_console.print("error: every trial failed; see `peftlab results` for the reasons")
        raise typer.Exit(1)


def _open_store(url: str | None):
    from peftlab.store import ResultsStore

    from peftlab.locations import require_store

    url = settings.store_url(url)
    require_store(url)
    return ResultsStore(url)  # an older store is brought to the current schema, as `run` does


def _read_store(url: str | None):
    """The results store opened for reading only (it must be at the current schema)."""
    from peftlab.store import ResultsStore

    from peftlab.locations import require_store

    url = settings.store_url(url)
    require_store(url)
    return ResultsStore(url, read_only=True)


class ResultTable(str, Enum):
    leaderboard = "leaderboard"
    seeds = "seeds"
    ranks = "ranks"


@app.command()
@user_errors
def results(
    name: Annotated[Optional[str], typer.Argument(help="Experiment name (default: the latest).")] = None,
    store: StoreOpt = None,
    format: Annotated[Format, typer.Option("--format", help="table, csv, json or markdown.")] = Format.table,
    table: Annotated[ResultTable, typer.Option(
        "--table", help="csv and markdown: which table (json holds all three).")] = ResultTable.leaderboard,
) -> None:
    """The leaderboard of an experiment from the results store; with several seeds per
    configuration, the seed summary (mean, CI, paired-test verdict) and the average ranks too."""
    from peftlab.progress import leaderboard_table, ranks_table, seeds_table
    from peftlab.store import TrialStatus

    results_store = _open_store(store)
    experiments = results_store.experiments()
    if not experiments:
        raise UserError("the results store holds no experiments yet")
    if name is None:
        name = max(experiments, key=lambda e: e.created_at).name
    elif results_store.get_experiment(name) is None:
        known = ", ".join(e.name for e in experiments)
        raise UserError(f"no experiment named '{name}' (known: {known})")
    rows = results_store.leaderboard(name)
    summary, ranks = _seed_tables(store, name, results_store.get_experiment(name).spec)
    if format is Format.table:
        console.print(leaderboard_table(rows))
        failed = results_store.trials(name, status=TrialStatus.FAILED)
        for trial in failed:
            console.print(f"  failed {trial.method} {trial.trial_id}: {trial.error}", highlight=False)
        if summary is not None:
            console.print(seeds_table(summary))
        if ranks is not None:
            console.print(ranks_table(ranks))
        return
    tables = {
        ResultTable.leaderboard: [asdict(row) for row in rows],
        ResultTable.seeds: [] if summary is None else _records(
            summary[[c for c in (*SEED_COLUMNS, "budget") if c in summary]]),
        ResultTable.ranks: [] if ranks is None else _records(ranks),
    }
    if format is Format.json:
        document = {"experiment": name, **{key.value: records for key, records in tables.items()}}
        sys.stdout.write(json.dumps(document, indent=2, default=_cell) + "\n")
        return
    records = tables[table]
    if not records and table is not ResultTable.leaderboard:
        raise UserError(f"experiment '{name}' has no {table.value} table: it needs configurations run with "
                        "several seeds (`training.seeds`)")
    if format is Format.markdown:
        sys.stdout.write(_markdown(records or [{"task": "", "method": ""}]))
    else:
        sys.stdout.write(_csv(records, empty=["task", "method"]))


SEED_COLUMNS = ["experiment", "task", "model", "domain", "method", "hparams", "n_seeds", "mean", "std", "ci_lo",
                "ci_hi", "verdict", "n_paired", "p_value", "p_holm", "rank", "best_trial", "trainable_params",
                "trainable_pct", "peak_memory_bytes", "train_seconds", "samples_per_second"]
"""The seed table's columns in csv, json and markdown, as in the dashboard's Leaderboard."""


def _records(frame) -> list[dict]:
    """DataFrame rows as plain dicts: NaN becomes None, numpy scalars Python numbers."""
    return [{key: (None if isinstance(value, float) and math.isnan(value) else
                   value.item() if hasattr(value, "item") else value) for key, value in row.items()}
            for row in frame.to_dict(orient="records")]


def _cell(value) -> str:
    if isinstance(value, Enum):
        return str(value.value)
    return json.dumps(value) if isinstance(value, (dict, list)) else ("" if value is None else str(value))


def _csv(records: list[dict], empty: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(records[0]) if records else empty)
    writer.writeheader()
    for record in records:
        writer.writerow({k: _cell(v) for k, v in record.items()})
    return buffer.getvalue()


def _markdown(records: list[dict]) -> str:
    columns = list(records[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)).replace("|", "\\|") for c in columns) + " |" for r in records]
    return "\n".join(lines) + "\n"


def _seed_tables(url: str | None, name: str, spec: dict):
    """(seed summary, rank table) of an experiment, each None where it does not apply: the summary
    (mean, std, 95% bootstrap CI and paired-test verdict over the seeds of each method's best
    configuration) needs a configuration with several seeds, the ranks several tasks."""
    from peftlab.dashboard import queries, stats
    from peftlab.spec import budget_params

    engine = queries.open_engine(settings.store_url(url))
    try:
        with engine.connect() as connection:
            seeds = queries.leaderboard_seeds(connection, queries.Filters(experiment=(name,)))
    finally:
        engine.dispose()
    if seeds.empty or seeds.groupby(["task", "method"])["seed"].nunique().max() < 2:
        return None, None
    summary = stats.summarize(seeds)
    budget = spec.get("budget")
    if budget is not None:
        summary["budget"] = [budget_params(budget, int(total)) for total in summary["total_params"]]
    ranks = stats.domain_matrix(summary)[2] if summary["task"].nunique() > 1 else None
    return summary, ranks


@app.command()
@user_errors
def methods(
    format: Annotated[Format, typer.Option("--format", help="table, csv, json or markdown.")] = Format.table,
    matrix: Annotated[bool, typer.Option(
        "--matrix", help="Which method applies to which task type and architecture, and why not.")] = False,
) -> None:
    """Registered PEFT methods: hyperparameters with defaults, parameter formula, mergeability."""
    from peftlab.workers.methods import FAILED_PLUGINS, all_methods

    for reason in FAILED_PLUGINS.values():
        err_console.print(f"warning: {reason}", markup=False, highlight=False)
    if matrix:
        _method_matrix(format)
        return

    described = [
        {
            "name": m.name, "summary": m.summary, "mergeable": m.mergeable, "formula": m.formula,
            "paper": m.paper,
            "hyperparameters": {h.name: {"default": h.default, "doc": h.doc} for h in m.all_hparams().values()},
        }
        for m in all_methods().values()
    ]
    if format is Format.json:
        sys.stdout.write(json.dumps(described, indent=2, default=str) + "\n")
        return
    if format is Format.markdown:
        sys.stdout.write(methods_markdown(described))
        return
    if format is Format.csv:
        sys.stdout.write(_csv([{**{k: v for k, v in m.items() if k != "hyperparameters"},
                                "hyperparameters": "; ".join(f"{k}={v['default']}" for k, v in m["hyperparameters"].items())}
                               for m in described], empty=["name"]))
        return
    table = Table(title="Registered methods", title_justify="left", show_lines=True)
    for column in ("method", "trains", "hyperparameters (default)", "params formula", "mergeable"):
        table.add_column(column, overflow="fold")
    for m in described:
        hps = ", ".join(f"{k}={v['default']}" for k, v in m["hyperparameters"].items())
        table.add_row(m["name"], m["summary"], hps, m["formula"], "yes" if m["mergeable"] else "no")
    console.print(table)


def _method_matrix(format: Format) -> None:
    """`peftlab methods --matrix`: each method's applicability check on small meta-device models."""
    from peftlab.workers.method_matrix import general, matrix

    columns, cells = matrix()
    labels = [c.label for c in columns]
    if format is Format.json:
        sys.stdout.write(json.dumps(cells, indent=2) + "\n")
        return
    if format is Format.csv:
        sys.stdout.write(_csv([{"method": m, "task": label, "applies": not problems, "reason": "; ".join(problems)}
                               for m, row in cells.items() for label, problems in row.items()], empty=["method"]))
        return
    reasons: dict[str, int] = {}

    def cell(method: str, problems: list[str]) -> str:
        if not problems:
            return "yes"
        return f"no [{reasons.setdefault(general(problems[0], method), len(reasons) + 1)}]"

    rows = [[m, *(cell(m, row[label]) for label in labels)] for m, row in cells.items()]
    notes = [f"[{n}] {reason}" for reason, n in reasons.items()]
    if format is Format.markdown:
        lines = ["| method | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        sys.stdout.write("\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
        return
    table = Table(title="Methods x task types (with each method's defaults)", title_justify="left")
    for column in ("method", *labels):
        table.add_column(column, overflow="fold")
    for r in rows:
        table.add_row(*r)
    console.print(table)
    for note in notes:
        console.print(note, markup=False, highlight=False)


def methods_markdown(described: list[dict]) -> str:
    """The README's methods table, generated from the registry so it cannot drift."""
    lines = ["| method | trains | parameters | mergeable | hyperparameters (default) | source |",
             "|---|---|---|---|---|---|"]
    for m in described:
        hps = ", ".join(f"`{k}`={v['default']}" for k, v in m["hyperparameters"].items())
        lines.append(f"| `{m['name']}` | {m['summary']} | {m['formula']} | {'yes' if m['mergeable'] else 'no'} "
                     f"| {hps} | {m['paper']} |")
    return "\n".join(lines) + "\n"


@app.command()
@user_errors
def pretrain(
    name: Annotated[Optional[str], typer.Argument(help="The backbone to build; none lists them.")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Optimizer steps (default: the recipe's).")] = None,
) -> None:
    """Build one of peftlab's small pretrained backbones (a decoder, a ViT) from the data dir, for
    machines that cannot download models; a spec then names it as `model:`."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from peftlab.workers import backbones

    if name is None:
        table = Table(title=f"Backbones (built under {settings.backbones_dir()})", title_justify="left")
        for column in ("name", "what", "built"):
            table.add_column(column, overflow="fold")
        for b in backbones.BACKBONES.values():
            found = backbones.stamp(b.name)
            built = (f"{found['steps']} steps, last loss {found['last_loss']}" if found
                     else f"no ({b.steps:,} steps)")
            table.add_row(b.name, b.summary, built)
        console.print(table)
        return
    with Progress(TextColumn(f"pretraining {name}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("loss {task.fields[loss]:.3f}"), TimeRemainingColumn(), console=err_console,
                  transient=True) as bar:
        task = bar.add_task(name, total=None, loss=float("nan"))

        def progress(step: int, total: int, loss: float) -> None:
            bar.update(task, completed=step, total=total, loss=loss)

        record = backbones.build(name, steps=steps, progress=progress)
    figures = ", ".join(f"{k} {record[k]}" for k in ("first_loss", "last_loss", "validation_accuracy") if k in record)
    console.print(f"[green]built[/] {name} in {record['seconds']:.0f}s ({record['steps']} steps; {figures}) "
                  f"at {backbones.folder(name)}")


@app.command("eval")
@user_errors
def evaluate(
    name: Annotated[str, typer.Argument(help="Experiment name.")],
    trial: Annotated[Optional[str], typer.Option("--trial", help="The trial whose adapter is scored.")] = None,
    method: Annotated[Optional[str], typer.Option("--method", help="Or: the best trial of this method.")] = None,
    task: Annotated[Optional[str], typer.Option("--task", help="The task, where the method ran on several.")] = None,
    dataset: Annotated[Optional[str], typer.Option(
        "--dataset", help="Another data set of the task's type and labels (a registry name, a file or a Hub id); "
                          "default: the trial's own data.")] = None,
    split: Annotated[str, typer.Option("--split", help="validation or test: the split scored.")] = "test",
    store: StoreOpt = None,
) -> None:
    """Load a saved adapter onto its base model and print its metrics on a split of its data."""
    from peftlab.scoring import score

    record, metrics = score(_read_store(store), name, trial_id=trial, method=method, task=task,
                            dataset=dataset, split=split)
    where = f"the {split} split of {dataset or record.task}"
    table = Table(title=f"{record.method} trial {record.trial_id} of {name} on {where}", title_justify="left")
    table.add_column("metric")
    table.add_column("value")
    if dataset is None:
        table.add_column("recorded at the trial's end")
    for key, value in metrics.items():
        row = [f"{split}/{key}", f"{value:.6f}"]
        if dataset is None:
            recorded = record.final_metrics.get(f"{split}/{key}")
            row.append("-" if recorded is None else f"{recorded:.6f}")
        table.add_row(*row)
    console.print(table)


@app.command()
@user_errors
def predict(
    name: Annotated[str, typer.Argument(help="Experiment name.")],
    file: Annotated[Path, typer.Option("--file", help="Rows to label: a csv, tsv, json or jsonl file with the "
                                       "task's text column.")],
    out: Annotated[Path, typer.Option("--out", help="A new csv file for the predictions.")],
    trial: Annotated[Optional[str], typer.Option("--trial", help="The trial whose adapter predicts.")] = None,
    method: Annotated[Optional[str], typer.Option("--method", help="Or: the best trial of this method.")] = None,
    task: Annotated[Optional[str], typer.Option("--task", help="The task, where the method ran on several.")] = None,
    store: StoreOpt = None,
) -> None:
    """Label each row of a file with a saved adapter: row, text, prediction and its probability."""
    from peftlab.scoring import predict as predictions

    if out.exists():
        raise UserError(f"{out} already exists: choose a new file for the predictions")
    record, rows = predictions(_read_store(store), name, file, trial_id=trial, method=method,
                               task=task)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    partial.write_text(_csv(rows, empty=["row", "prediction", "probability"]))
    partial.rename(out)
    console.print(f"[green]{len(rows)} predictions[/] of {record.method} trial {record.trial_id} written to {out}")


@app.command()
@user_errors
def export(
    name: Annotated[str, typer.Argument(help="Experiment name.")],
    method: Annotated[str, typer.Option("--method", help="The method whose best trial is exported.")],
    out: Annotated[Path, typer.Option("--out", help="A new folder to write the export into.")],
    task: Annotated[Optional[str], typer.Option("--task", help="The task, where the method ran on several.")] = None,
    merge: Annotated[bool, typer.Option("--merge", help="Fold the adapter into the base model: a plain "
                                        "Hugging Face model folder (mergeable methods only).")] = False,
    store: StoreOpt = None,
) -> None:
    """A method's best trial as a self-contained folder: its adapter and a model card (README.md)."""
    from peftlab.export import export as write_export

    written = write_export(_read_store(store), name, method, out, task=task, merge=merge)
    console.print(f"[green]exported[/] {method} of {name} to {written}" + (" (merged)" if merge else ""))


@app.command()
@user_errors
def migrate(store: StoreOpt = None) -> None:
    """Bring a results store to the current schema."""
    from peftlab.store import migrate as run_migrations

    from sqlalchemy.engine import make_url

    url = settings.store_url(store)
    run_migrations(url)
    console.print(f"{make_url(url).render_as_string(hide_password=True)}: at the current schema")


@app.command()
@user_errors
def dashboard(
    store: StoreOpt = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind; anything but 127.0.0.1 exposes the results to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to serve on.")] = 8501,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Start the Streamlit dashboard on a read-only connection to the results store."""
    import os
    import subprocess

    from peftlab.dashboard import queries

    url = settings.store_url(store)
    shown = queries.check_store(url)  # missing or unmigrated: one line, exit 2, before Streamlit
    app_path = Path(queries.__file__).resolve().with_name("app.py")
    env = {**os.environ, settings.ENV_STORE: url, settings.ENV_TRACKING: settings.tracking_uri(tracking_uri)}
    command = [sys.executable, "-m", "streamlit", "run", str(app_path),
               "--server.address", host, "--server.port", str(port), "--server.headless", "true",
               "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
               "--client.toolbarMode", "minimal"]
    console.print(f"dashboard on http://{host}:{port} (read-only: {shown}); Ctrl-C stops it")
    try:
        code = subprocess.call(command, env=env)
    except KeyboardInterrupt:
        code = 130
    raise typer.Exit(code)


# Cluster submission through the Ray Jobs API: the sweep's driver runs on the cluster.

ClusterOpt = Annotated[str | None, typer.Option("--address", help="Ray dashboard URL, http://HEAD:8265 (else $RAY_API_SERVER_ADDRESS).")]
JobArg = Annotated[str, typer.Argument(help="The job's submission id, as `peftlab submit` printed it and `peftlab jobs` lists it.")]


@app.command()
@user_errors
def submit(
    spec_path: SpecArg,
    address: ClusterOpt = None,
    store: StoreOpt = None,
    tracking_uri: TrackingOpt = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Print the job id and return instead of following the logs.")] = False,
) -> None:
    """Run a sweep on a Ray cluster as a Ray Job: print the job id, then follow its logs until it ends."""
    from peftlab.jobs import Cluster
    from peftlab.spec import load_spec

    # The address is checked first, in a second or two; validating the spec imports the method
    # registry (torch, peft). Either fails with one line before anything is submitted.
    cluster = Cluster.connect(address)
    spec = load_spec(spec_path)
    job_id = cluster.submit(spec_path, spec, store_url=store, tracking_uri=tracking_uri)
    console.print(job_id, highlight=False)
    if not no_wait:
        _follow(cluster, job_id)


@app.command("jobs")
@user_errors
def list_jobs(address: ClusterOpt = None) -> None:
    """Jobs submitted to a Ray cluster: id, status, experiment, start and end."""
    from peftlab.jobs import EXPERIMENT_KEY, Cluster, message

    cluster = Cluster.connect(address)
    table = Table(title=f"Jobs on {cluster.url}", title_justify="left")
    table.add_column("job", no_wrap=True)
    for column in ("status", "experiment", "started", "ended", "message"):
        table.add_column(column, overflow="fold")
    for job in cluster.jobs():
        table.add_row(job.submission_id, job.status.value, (job.metadata or {}).get(EXPERIMENT_KEY, "-"),
                      _job_time(job.start_time), _job_time(job.end_time), message(job))
    console.print(table)


@app.command()
@user_errors
def logs(
    job_id: JobArg,
    address: ClusterOpt = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the job ends; exit 1 unless it succeeded.")] = False,
) -> None:
    """Print what a job's driver printed: the sweep's progress and leaderboard."""
    from peftlab.jobs import Cluster

    cluster = Cluster.connect(address)
    if follow:
        _follow(cluster, job_id)
    else:
        sys.stdout.write(cluster.logs(job_id))


@app.command()
@user_errors
def stop(job_id: JobArg, address: ClusterOpt = None) -> None:
    """Stop a job (its driver, and with it the trials it started) and wait until it has stopped."""
    from peftlab.jobs import Cluster

    job = Cluster.connect(address).stop(job_id)
    console.print(f"{job_id}: {job.status.value}", highlight=False)


def _follow(cluster, job_id: str) -> None:
    """Print the job's output as it comes; exit 1 unless it succeeded, 130 on Ctrl-C (the job goes on)."""
    from peftlab.jobs import message

    def write(chunk: str) -> None:
        sys.stdout.write(chunk)
        sys.stdout.flush()

    try:
        job = cluster.follow(job_id, write)
    except KeyboardInterrupt:
        err_console.print(f"stopped following; the job goes on: `peftlab logs {job_id} --follow`, `peftlab stop {job_id}`")
        raise typer.Exit(130) from None
    if job.status.value != "SUCCEEDED":
        err_console.print(f"error: job {job_id} {job.status.value.lower()}: {message(job)}", markup=False, highlight=False)
        raise typer.Exit(1)
    console.print(f"{job_id}: {job.status.value}", highlight=False)


def _job_time(milliseconds: int | None) -> str:
    from datetime import datetime

    return datetime.fromtimestamp(milliseconds / 1000).strftime("%Y-%m-%d %H:%M:%S") if milliseconds else "-"


if __name__ == "__main__":
    app()
