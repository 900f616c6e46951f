"""The sweep driver: preflight checks, then one Ray Tune run per task into one experiment.

Everything a user can get wrong is checked by `preflight` before Ray starts or anything is
written; after that, trials are recorded by the `Recorder` callback as they run.
"""
from __future__ import annotations

import os
import platform as _stdlib_platform
import re
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from rich.console import Console

from peftlab import settings
from peftlab.errors import SpecError, UserError
from peftlab.search import TaskPlan, build_scheduler, build_search_alg, plan
from peftlab.spec import ExperimentSpec, method_spaces
from peftlab.store import ExperimentStatus, LeaderboardRow, ResultsStore, TrialStatus
from peftlab.tracking import Tracker

PACKAGES = ("peftlab", "torch", "transformers", "peft", "ray", "optuna", "mlflow", "sqlalchemy")

SMOKE = {"max_steps": 12, "eval_every": 6, "batch_size": 16, "max_train_samples": 128,
         "max_eval_samples": 128, "num_samples_per_method": 1}
"""What `--smoke` shrinks a spec to: a quick check that every piece runs, not a result."""


@dataclass(frozen=True)
class SweepOutcome:
    experiment: str
    counts: dict[str, int]
    leaderboard: list[LeaderboardRow]

    @property
    def succeeded(self) -> bool:
        return self.counts.get(TrialStatus.COMPLETED.value, 0) + self.counts.get(TrialStatus.EARLY_STOPPED.value, 0) > 0


def smoke(spec: ExperimentSpec) -> ExperimentSpec:
    """The same experiment, shrunk: few steps, few samples, one seed, one config per method."""
    tasks = [t.model_copy(update={
        "max_train_samples": min(t.max_train_samples or SMOKE["max_train_samples"], SMOKE["max_train_samples"]),
        "max_eval_samples": min(t.max_eval_samples or SMOKE["max_eval_samples"], SMOKE["max_eval_samples"]),
    }) for t in spec.tasks]
    training = spec.training.model_copy(update={
        "max_steps": SMOKE["max_steps"], "eval_every": SMOKE["eval_every"],
        "batch_size": min(spec.training.batch_size, SMOKE["batch_size"]), "seeds": spec.training.seeds[:1],
    })
    search = spec.search
    if search.algorithm != "grid":
        search = search.model_copy(update={"num_samples": len(spec.methods) * SMOKE["num_samples_per_method"]})
    return spec.model_copy(update={"name": f"{spec.name}-smoke", "tasks": tasks, "training": training, "search": search})


def preflight(spec: ExperimentSpec, *, source: str | None = None) -> None:
    """Load every task's data and the model's structure; check each method can apply."""
    from peftlab.workers.data import load_text_classification
    from peftlab.workers.methods import TaskInfo, get_method
    from peftlab.workers.models import head_modules, meta_classifier

    problems: list[str] = []
    spaces, _ = method_spaces(spec)
    for i, task in enumerate(spec.tasks):
        try:
            data = load_text_classification(
                task.dataset, text_column=task.text_column, label_column=task.label_column,
                max_train_samples=task.max_train_samples, max_eval_samples=task.max_eval_samples,
                eval_fraction=task.eval_fraction, data_dir=settings.data_dir(),
            )
        except UserError as exc:
            problems.append(f"tasks[{i}].dataset: {exc}")
            continue
        try:
            model = meta_classifier(spec.model, data.num_labels)
        except UserError as exc:
            problems.append(f"model: {exc}")
            break
        info = TaskInfo(task.type, data.num_labels, head_modules(model))
        for name, space in spaces.items():
            method = get_method(name)
            for variant in _variants(space.leaves):
                for problem in method.check_applicable(model, method.resolve(variant), info):
                    problems.append(f"methods.{name}: {problem}")
    if problems:
        raise SpecError(list(dict.fromkeys(problems)), source=source)


def _variants(leaves: dict) -> list[dict]:
    """One config per value of each list-valued leaf that shapes the model (targets, sizes)."""
    base = {k: leaf.values[0] for k, leaf in leaves.items() if leaf.kind in ("fixed", "choice")}
    variants = [base]
    for key, leaf in leaves.items():
        if leaf.kind == "choice":
            variants += [{**base, key: value} for value in leaf.values[1:]]
    return variants


def code_version() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return sha or metadata.version("peftlab")


def package_versions() -> dict[str, str]:
    versions = {"python": _stdlib_platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def check_ray_reachable(address: str | None, timeout: float = 5.0) -> None:
    """Fail in seconds, with one line, when a cluster address does not answer; Ray itself
    would retry its connection for minutes."""
    if not address or address in ("auto", "local"):
        return
    match = re.fullmatch(r"(?:ray://)?\[?([^\]/]+?)\]?:(\d+)/?", address)
    if match is None:
        raise UserError(f"cannot use Ray address '{address}': expected HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((match[1], int(match[2])), timeout=timeout).close()
    except OSError as exc:
        raise UserError(f"cannot reach Ray at {address}: {exc.strerror or exc}") from None


def init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot connect to Ray at {address or 'a new local instance'}: {reason}") from None


def _max_concurrent(spec: ExperimentSpec) -> int:
    import ray

    if spec.search.max_concurrent:
        return spec.search.max_concurrent
    cpus = ray.cluster_resources().get("CPU", 1)
    return max(1, int(cpus // spec.resources.cpus_per_trial))


def experiment_path(spec: ExperimentSpec, task_plan: TaskPlan) -> Path:
    return settings.ray_storage() / f"{spec.name}.{task_plan.task.label}"


def _trainable(spec: ExperimentSpec, task_plan: TaskPlan):
    from ray import tune

    from peftlab.workers.trial import TrialContext, run_trial

    data_dir = settings.data_dir()
    context = TrialContext(
        experiment=spec.name, model=spec.model, task=task_plan.task, training=spec.training,
        adapters_dir=str(settings.adapters_dir()), data_dir=str(data_dir) if data_dir else None,
        cpus=spec.resources.cpus_per_trial, gpus=spec.resources.gpus_per_trial,
    )
    return tune.with_resources(
        tune.with_parameters(run_trial, context=context),
        {"cpu": spec.resources.cpus_per_trial, "gpu": spec.resources.gpus_per_trial},
    )


def _run_task(spec: ExperimentSpec, task_plan: TaskPlan, *, store: ResultsStore, tracker: Tracker,
              console: Console) -> bool:
    """Run (or continue) one task's search; False if it was interrupted before the end."""
    from ray import tune

    from peftlab.progress import SweepProgress
    from peftlab.recorder import Recorder, bind

    bind(spec.name, store, tracker)
    path = experiment_path(spec, task_plan)
    if tune.Tuner.can_restore(path):
        # Callbacks, searcher and scheduler come back from the saved experiment state.
        console.print(f"[bold]{task_plan.task.label}[/]: continuing from {path}")
        tuner = tune.Tuner.restore(str(path), _trainable(spec, task_plan), resume_unfinished=True)
    else:
        recorder = Recorder(experiment=spec.name, model=spec.model, task_plan=task_plan,
                            seeds=spec.training.seeds, spec_hash=spec.spec_hash(), max_steps=spec.training.max_steps)
        concurrent = _max_concurrent(spec)
        console.print(f"[bold]{task_plan.task.label}[/]: {task_plan.num_trials} trials, "
                      f"{spec.search.algorithm} search, {spec.search.scheduler} scheduler, up to "
                      f"{concurrent} at once")
        tuner = tune.Tuner(
            _trainable(spec, task_plan),
            tune_config=tune.TuneConfig(
                search_alg=build_search_alg(spec, task_plan),
                scheduler=build_scheduler(spec, task_plan),
                num_samples=task_plan.num_trials,
                max_concurrent_trials=concurrent,
                reuse_actors=False,  # a fresh process per trial keeps peak-memory accounting honest
            ),
            run_config=tune.RunConfig(
                name=path.name,
                storage_path=str(path.parent),
                callbacks=[recorder, SweepProgress(task_plan, spec.training.max_steps)],
                failure_config=tune.FailureConfig(max_failures=0),
                verbose=0,
            ),
        )
    grid = tuner.fit()
    # Tune returns normally on Ctrl-C after saving its state; unfinished trials tell.
    return grid.num_terminated + grid.num_errors >= task_plan.num_trials


def run_sweep(spec: ExperimentSpec, *, address: str | None = None, store_url: str | None = None,
              tracking_uri: str | None = None, console: Console | None = None,
              source: str | None = None, resume: bool = False) -> SweepOutcome:
    """Preflight, record the experiment, run every task's search, return the leaderboard.

    With `resume`, tasks whose Tune state exists continue from it; the others start.
    Raises KeyboardInterrupt (experiment INTERRUPTED) when the user stopped the sweep.
    """
    console = console or Console()
    preflight(spec, source=source)
    check_ray_reachable(settings.ray_address(address))
    store_url, tracking_uri = settings.store_url(store_url), settings.tracking_uri(tracking_uri)
    store = ResultsStore(store_url)
    # Tune's legacy reporter at verbose=0 prints nothing; the sweep's own display replaces it.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # MLflow's first connection (import, schema migration) overlaps Ray's start-up; an
    # unreachable tracking server still fails here, before any trial runs.
    with ThreadPoolExecutor(max_workers=1) as pool:
        tracker = pool.submit(Tracker, tracking_uri, spec.name, artifact_root=settings.mlflow_artifacts())
        init_ray(settings.ray_address(address))
        tracker = tracker.result()
    plans = plan(spec)
    first = plans[0]
    if not resume:
        store.create_experiment(spec.name, spec.model_dump(mode="json"), spec.spec_hash(), first.metric,
                                first.mode, code_version(), package_versions())
    store.set_experiment_status(spec.name, ExperimentStatus.RUNNING)
    status = ExperimentStatus.FAILED
    try:
        for task_plan in plans:
            if not _run_task(spec, task_plan, store=store, tracker=tracker, console=console):
                raise KeyboardInterrupt
        outcome = outcome_of(store, spec.name)
        status = ExperimentStatus.COMPLETED if outcome.succeeded else ExperimentStatus.FAILED
        return outcome
    except KeyboardInterrupt:
        status = ExperimentStatus.INTERRUPTED
        raise
    finally:
        store.set_experiment_status(spec.name, status)


def resume_sweep(name: str, *, address: str | None = None, store_url: str | None = None,
                 tracking_uri: str | None = None, console: Console | None = None) -> SweepOutcome:
    """Continue an interrupted sweep from the spec recorded in the store and Tune's saved state."""
    from peftlab.spec import parse_spec

    record = ResultsStore(settings.store_url(store_url)).get_experiment(name)
    if record is None:
        raise UserError(f"no experiment named '{name}' in {settings.store_url(store_url)}")
    spec = parse_spec(record.spec, source=f"experiment {name}")
    return run_sweep(spec, address=address, store_url=store_url, tracking_uri=tracking_uri,
                     console=console, resume=True)


def outcome_of(store: ResultsStore, name: str) -> SweepOutcome:
    counts: dict[str, int] = {}
    for trial in store.trials(name):
        counts[trial.status.value] = counts.get(trial.status.value, 0) + 1
    return SweepOutcome(name, counts, store.leaderboard(name))
