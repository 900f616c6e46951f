"""The sweep driver: preflight checks, then one Ray Tune run per task into one experiment.

Everything a user can get wrong is checked by `preflight` before Ray starts or anything is
written; after that, trials are recorded by the `Recorder` callback as they run.
"""
from __future__ import annotations

import logging
import os
import platform as _stdlib_platform
import re
import signal
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from rich.console import Console

from peftlab import settings
from peftlab.budget import BudgetFit
from peftlab.errors import SpecError, UserError
from peftlab.locations import check_store_url, check_tracking_uri, require_store
from peftlab.search import TaskPlan, build_search_alg, plan, rung_plan, seed_plan
from peftlab.spec import ExperimentSpec, method_spaces
from peftlab.state import SEARCH, SEEDS, check_owned, claim, state_path
from peftlab.store import (
    FINISHED,
    SMOKE_SUFFIX,
    ExperimentStatus,
    LeaderboardRow,
    ResultsStore,
    TrialRecord,
    TrialStatus,
)
from peftlab.tracking import Tracker

PACKAGES = ("peftlab", "torch", "transformers", "peft", "ray", "optuna", "mlflow", "sqlalchemy")

SMOKE = {"max_steps": 12, "eval_every": 6, "batch_size": 16, "max_train_samples": 128,
         "max_eval_samples": 128, "num_samples_per_method": 1, "seeds": 2}
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
        "retention_samples": min(t.retention_samples, SMOKE["max_eval_samples"]),
    }) for t in spec.tasks]
    training = spec.training.model_copy(update={
        "max_steps": SMOKE["max_steps"], "eval_every": SMOKE["eval_every"],
        "batch_size": min(spec.training.batch_size, SMOKE["batch_size"]), "seeds": spec.training.seeds[:1],
    })
    # Random search with one configuration per method, whatever the spec's algorithm: a grid's
    # every combination is a result, not a check.
    search = spec.search.model_copy(update={
        "algorithm": "random", "num_samples": SMOKE["num_samples_per_method"], "per_method": True})
    seeds = spec.final_seeds[:SMOKE["seeds"]] or None
    return spec.model_copy(update={"name": f"{spec.name}{SMOKE_SUFFIX}", "tasks": tasks, "training": training,
                                   "search": search, "seeds": seeds})


def preflight(spec: ExperimentSpec, *, source: str | None = None, data_reports: list | None = None) -> list[BudgetFit]:
    """Load every task's data and its model's structure; check each method can apply; size the
    methods to the budget. Returns the budget fits (empty without a budget); appends each task's
    (split summaries, warnings) to `data_reports` where one is given (see data_checks.py)."""
    from peftlab.budget import fit_budgets
    from peftlab.workers.methods import Method, TaskInfo, get_method
    from peftlab.workers.tasks import task_kind

    problems: list[str] = []
    if spec.quantization is not None:
        from peftlab.workers.models import quantization_problem

        if (reason := quantization_problem()) is not None:
            problems.append(f"quantization: {reason}")
    spaces, _ = method_spaces(spec)
    models = {}
    data_dir = settings.data_dir()
    for i, task in enumerate(spec.tasks):
        kind = task_kind(task.type)
        try:
            data = kind.load_data(task, data_dir)
        except UserError as exc:
            problems.append(f"tasks[{i}].dataset: {exc}")
            continue
        if data_reports is not None:
            from peftlab.workers.data_checks import summarize

            data_reports.append(summarize(task.label, data))
        try:
            model = kind.meta_model(spec.model_for(task), data, data_dir)
        except UserError as exc:
            problems.append(f"tasks[{i}].model: {exc}")
            continue
        if spec.training.gradient_checkpointing and not getattr(model, "supports_gradient_checkpointing", False):
            problems.append(f"training.gradient_checkpointing: {type(model).__name__} ({spec.model_for(task)}, "
                            f"tasks[{i}]) does not support gradient checkpointing")
        info = TaskInfo(task.type, data.num_labels, kind.head_modules(model))
        models[task.label] = (model, info)
        if task.bias_eval:
            from peftlab.workers.bias import bias_problems

            problems += [f"tasks[{i}].bias_eval: {p}"
                         for p in bias_problems(task.bias_eval, spec.model_for(task), task.type, data_dir=data_dir)]
        texts = None
        for name in spec.methods_for(task):
            method = get_method(name)
            for variant in _variants(spaces[name].leaves):
                hparams = method.resolve(variant)
                found = method.check_applicable(model, hparams, info)
                if not found and type(method).data_problems is not Method.data_problems:
                    texts = kind.corpus(data) if texts is None else texts
                    found = method.data_problems(hparams, texts)
                for problem in found:
                    problems.append(f"methods.{name}: {problem} (on tasks[{i}], {task.label})")
    if problems:
        raise SpecError(list(dict.fromkeys(problems)), source=source)
    try:
        return fit_budgets(spec, models) if spec.budget is not None else []
    except UserError as exc:  # a budget a method cannot meet: a problem of this spec
        raise SpecError([str(exc)], source=source) from None


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


def local_resources() -> dict[str, float]:
    """What a local Ray instance will offer: every CPU, and the GPUs torch can see."""
    import torch

    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def check_resources(spec: ExperimentSpec, available: dict[str, float], where: str, source: str | None = None) -> None:
    """Refuse, in one line, a trial that could never be placed: Ray would wait for it forever."""
    res, workers = spec.resources, spec.resources.workers_per_trial
    for kind, each, key in (("CPU", res.cpus_per_trial, "cpus_per_trial"), ("GPU", res.gpus_per_trial, "gpus_per_trial")):
        needed, have = each * workers, available.get(kind, 0.0)
        per = f" ({workers} workers x {each:g})" if workers > 1 else ""
        if needed > have:
            raise UserError(f"resources.{key}: a trial needs {needed:g} {kind}s{per} but {where} has "
                            f"{have:g}; lower it or add {kind}s to the cluster", where=source)


class _Replaced(logging.Filter):
    """Drops Tune's log lines that peftlab says better itself: a failed trial's whole traceback
    (the display prints its reason and where its log is) and Tune's own resume hint (the CLI
    names `peftlab resume`)."""

    PREFIXES = ("Trial task failed for trial", "Experiment has been interrupted")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.PREFIXES)


def quiet_tune_logs() -> None:
    for name in ("ray.tune.execution.tune_controller", "ray.tune.tune"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Replaced) for f in logger.filters):
            logger.addFilter(_Replaced())


TERMINATED: list[int] = []
"""Fills when SIGTERM interrupted the sweep (the CLI then exits 143, 128 + 15)."""
_SIGTERM_WANTED: list[bool] = []


def interrupt_on_sigterm() -> None:
    """Make SIGTERM (docker stop, `timeout`, `peftlab stop`) interrupt a sweep as Ctrl-C does: Ray
    Tune saves its state and stops its trials, and rows and runs are left resumable. Installed
    again once Ray has started, since Ray puts its own handler (which aborts) in its place."""
    import threading

    def interrupt(signum, frame) -> None:
        TERMINATED.append(signum)
        signal.raise_signal(signal.SIGINT)  # Tune's handler while it runs, else KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)
        _SIGTERM_WANTED[:] = [True]


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
    # A multi-worker trial starts only once all its workers fit; count what the workers take.
    resources, workers = ray.cluster_resources(), spec.resources.workers_per_trial
    fits = resources.get("CPU", 1) // (spec.resources.cpus_per_trial * workers)
    if spec.resources.gpus_per_trial:
        fits = min(fits, resources.get("GPU", 0) // (spec.resources.gpus_per_trial * workers))
    return max(1, int(fits))


def run_params(spec: ExperimentSpec) -> dict[str, object]:
    """How every trial of the experiment trains, as MLflow params beside its hyperparameters."""
    training, q = spec.training, spec.quantization
    params: dict[str, object] = {
        "training.precision": training.precision,
        "training.gradient_accumulation_steps": training.gradient_accumulation_steps,
        "training.gradient_checkpointing": training.gradient_checkpointing,
        "training.batch_size": training.batch_size,
        "model_dtype": spec.model_dtype,
        "resources.gpus_per_trial": spec.resources.gpus_per_trial,
        "resources.workers_per_trial": spec.resources.workers_per_trial,
        "quantization": "none" if q is None else f"{q.bits}-bit" + (f" {q.type}" if q.bits == 4 else ""),
    }
    if q is not None and q.bits == 4:
        params.update({"quantization.double_quant": q.double_quant, "quantization.compute_dtype": q.compute_dtype})
    return params


def existing_state(spec: ExperimentSpec) -> list[tuple[Path, str, str]]:
    """(folder, task label, phase) of this experiment's Tune state folders that exist on disk."""
    return [(path, task.label, phase) for task in spec.tasks for phase in (SEARCH, SEEDS)
            if (path := state_path(spec.name, task.label, phase)).exists()]


def best_configs(store: ResultsStore, spec: ExperimentSpec, task_plan: TaskPlan) -> tuple[dict[str, dict], set]:
    """Each method's best configuration on the task (method -> hyperparameters): the best that ran
    to the end, else (ASHA stopped them all) the best stopped one; and the (method, seed) pairs
    already run to the end with it, which need no re-run."""
    ran = [t for t in store.trials(spec.name) if t.task == task_plan.task.label and t.objective is not None
           and t.status in (TrialStatus.COMPLETED, TrialStatus.EARLY_STOPPED)]
    best: dict[str, TrialRecord] = {}
    for trial in ran:
        held = best.get(trial.method)
        finished, held_finished = trial.status is TrialStatus.COMPLETED, held and held.status is TrialStatus.COMPLETED
        higher = held is not None and (trial.objective > held.objective if task_plan.mode == "max"
                                       else trial.objective < held.objective)
        if held is None or (finished and not held_finished) or (finished == held_finished and higher):
            best[trial.method] = trial
    done = {(t.method, t.seed) for t in ran if t.status is TrialStatus.COMPLETED
            and t.method in best and t.hparams == best[t.method].hparams}
    return {m: t.hparams for m, t in best.items()}, done


def _trainable(spec: ExperimentSpec, task_plan: TaskPlan, tracking_uri: str, finished: dict[str, str] | None = None,
               rungs=None, rung_board: str | None = None):
    import ray
    from ray import tune

    from peftlab.workers.trial import TrialContext, run_trial

    data_dir = settings.data_dir()
    context = TrialContext(
        experiment=spec.name, model=spec.model_for(task_plan.task), task=task_plan.task, training=spec.training,
        adapters_dir=str(settings.adapters_dir()), data_dir=str(data_dir) if data_dir else None,
        cpus=spec.resources.cpus_per_trial, gpus=spec.resources.gpus_per_trial,
        model_dtype=spec.model_dtype, quantization=spec.quantization, finished=finished or {},
        tracking_uri=tracking_uri, driver_node=ray.get_runtime_context().get_node_id(),
        shared_storage=settings.ray_storage_shared(), metric=task_plan.metric, mode=task_plan.mode,
        rungs=rungs, rung_board=rung_board,
    )
    if spec.resources.workers_per_trial > 1:
        from peftlab.workers.distributed import run_distributed_trial

        # The Tune trial only drives a Ray Train run whose workers reserve their own CPUs and
        # GPUs; Ray refuses an empty request, so the driver asks for a token share of a CPU.
        return tune.with_resources(
            tune.with_parameters(run_distributed_trial, context=context,
                                 resources=spec.resources, deepspeed=spec.deepspeed),
            {"cpu": 0.01},
        )
    return tune.with_resources(
        tune.with_parameters(run_trial, context=context),
        {"cpu": spec.resources.cpus_per_trial, "gpu": spec.resources.gpus_per_trial},
    )


def _run_task(spec: ExperimentSpec, task_plan: TaskPlan, *, store: ResultsStore, tracker: Tracker,
              console: Console, phase: str = SEARCH) -> bool:
    """Run (or continue) one task's search, or its seed re-runs (phase SEEDS: every trial to the
    end); False if it was interrupted before the end."""
    from ray import tune

    from peftlab.atomic_fs import atomic_local_filesystem
    from peftlab.recorder import bind
    from peftlab.workers.rungs import board_name

    bind(spec.name, store, tracker)
    label = task_plan.task.label
    path = state_path(spec.name, label, phase)
    storage = atomic_local_filesystem()
    restoring = tune.Tuner.can_restore(str(path), storage_filesystem=storage)
    if restoring:
        check_owned(path, spec.name, spec.spec_hash(), label, phase)
    rungs = rung_plan(spec, task_plan) if phase == SEARCH else None
    name = board_name(spec.name, label)
    board = start_rung_board(rungs, name, path, restoring) if rungs else None
    try:
        return _fit(spec, task_plan, store=store, tracker=tracker, console=console, phase=phase, path=path,
                    storage=storage, restoring=restoring, rungs=rungs, board=name if rungs else None)
    finally:
        if board is not None:
            import ray

            ray.kill(board)


def start_rung_board(plan, name: str, state_dir: Path, restoring: bool):
    """The task's RungBoard actor, on the driver's node, its state beside the Tune state: a
    restored sweep continues the rungs it saved, a new one starts them empty."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from peftlab.workers.rungs import STATE_FILE, RungBoard

    state_dir.mkdir(parents=True, exist_ok=True)
    if not restoring:
        (state_dir / STATE_FILE).unlink(missing_ok=True)
    node = ray.get_runtime_context().get_node_id()
    board = ray.remote(RungBoard).options(
        name=name, num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
    ).remote(plan, str(state_dir))
    ray.get(board.snapshot.remote())  # started before any trial asks it
    return board


def _fit(spec: ExperimentSpec, task_plan: TaskPlan, *, store: ResultsStore, tracker: Tracker, console: Console,
         phase: str, path: Path, storage, restoring: bool, rungs, board: str | None) -> bool:
    """Create or restore the task's Tuner and run it to its end; False if interrupted before."""
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    from peftlab.progress import SweepProgress
    from peftlab.recorder import Recorder

    label = task_plan.task.label
    if restoring:
        # Callbacks, searcher and scheduler come back from the saved experiment state.
        console.print(f"[bold]{task_plan.task.label}[/]: continuing from {path}")
        # Trials the store has as finished may be unfinished in Tune's last saved state (the
        # driver died between the two): they are handed their status instead of a re-run.
        finished = {t.trial_id: t.status.value for t in store.trials(spec.name)
                    if t.task == label and t.status in FINISHED}
        tuner = tune.Tuner.restore(str(path), _trainable(spec, task_plan, tracker.uri, finished, rungs, board),
                                   resume_unfinished=True, storage_filesystem=storage)
    else:
        recorder = Recorder(experiment=spec.name, model=spec.model_for(task_plan.task), task_plan=task_plan,
                            seeds=spec.training.seeds, spec_hash=spec.spec_hash(), phase=phase,
                            run_params=run_params(spec), rung_board=board)
        claim(path, spec.name, spec.spec_hash(), label, phase)
        concurrent = _max_concurrent(spec)
        rung_text = (f"rungs at steps {', '.join(map(str, rungs.steps))} within each "
                     f"{'method' if rungs.by_method else 'task'}" if rungs else "no early stopping")
        what = (f"{spec.search.algorithm} search, {rung_text}" if phase == SEARCH
                else "the best configuration of each method with more seeds")
        console.print(f"[bold]{task_plan.task.label}[/]: {task_plan.num_trials} trials, {what}, up to "
                      f"{concurrent} at once")
        tuner = tune.Tuner(
            _trainable(spec, task_plan, tracker.uri, rungs=rungs, rung_board=board),
            tune_config=tune.TuneConfig(
                search_alg=build_search_alg(spec, task_plan),
                scheduler=FIFOScheduler(),  # trials start in index order, which the rungs rely on
                num_samples=task_plan.num_trials,
                max_concurrent_trials=concurrent,
                reuse_actors=False,  # a fresh process per trial keeps peak-memory accounting honest
            ),
            run_config=tune.RunConfig(
                name=path.name,
                storage_path=str(path.parent),
                storage_filesystem=storage,  # a killed driver leaves whole state files, never truncated ones
                callbacks=[recorder, SweepProgress(task_plan)],
                # A died trial starts again from its last checkpoint; only the last one is kept.
                failure_config=tune.FailureConfig(max_failures=spec.search.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
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
    import ray

    fits = preflight(spec, source=source)
    address = settings.ray_address(address)
    check_ray_reachable(address)
    if not address and not ray.is_initialized():
        check_resources(spec, local_resources(), "this machine", source)  # before a local Ray starts
    store_url, tracking_uri = settings.store_url(store_url), settings.tracking_uri(tracking_uri)
    check_store_url(store_url)
    check_tracking_uri(tracking_uri)
    store = ResultsStore(store_url)
    state = existing_state(spec)
    if state and not resume and store.get_experiment(spec.name) is None:
        # The state is from a run this store never saw: restoring it would record nothing.
        raise UserError(f"Tune state of experiment {spec.name!r} exists at {state[0][0]} but the store at {store_url} "
                        f"holds no such experiment: remove {settings.ray_storage()}/{spec.name}.* to start afresh, "
                        f"or use the store that has it and `peftlab resume {spec.name}`")
    for path, label, phase in state:
        check_owned(path, spec.name, spec.spec_hash(), label, phase)
    quiet_tune_logs()
    # Tune's legacy reporter at verbose=0 prints nothing; the sweep's own display replaces it.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Each trial checkpoint forces a Tune state snapshot (num_to_keep=1); Tune's warning about
    # frequent snapshots would interleave with the display at every evaluation.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Trials report progress between evaluations, without the metric; ASHA and the searchers
    # (EvaluationsOnly) act on evaluations only, and the spec's metric was checked at validation.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # MLflow's first connection (import, schema migration) overlaps Ray's start-up; an
    # unreachable tracking server still fails here, before any trial runs.
    with ThreadPoolExecutor(max_workers=1) as pool:
        tracker = pool.submit(Tracker, tracking_uri, spec.name, artifact_root=settings.mlflow_artifacts())
        init_ray(address)
        tracker = tracker.result()
    if _SIGTERM_WANTED:
        interrupt_on_sigterm()
    check_resources(spec, ray.cluster_resources(),
                    f"the cluster at {address}" if address else "the local Ray instance", source)
    if fits:
        from peftlab.progress import budget_table

        console.print(budget_table(fits))
    plans = plan(spec, sizes_of(fits))
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
            if not spec.final_seeds:
                continue
            best, done = best_configs(store, spec, task_plan)
            missing = sorted(set(task_plan.spaces) - set(best))
            if missing:
                console.print(f"[yellow]{task_plan.task.label}: no finished trial of {', '.join(missing)}; "
                              "not re-run with more seeds[/]")
            reruns = seed_plan(task_plan, best, spec.final_seeds, done)
            if reruns.num_trials and not _run_task(spec, reruns, store=store, tracker=tracker,
                                                   console=console, phase=SEEDS):
                raise KeyboardInterrupt
        outcome = outcome_of(store, spec.name)
        status = ExperimentStatus.COMPLETED if outcome.succeeded else ExperimentStatus.FAILED
        return outcome
    except KeyboardInterrupt:
        status = ExperimentStatus.INTERRUPTED
        # Trials cut short are neither running nor finished: `resume` restarts them.
        for run_id in store.interrupt_trials(spec.name):
            tracker.set_status(run_id, "KILLED")
        raise
    finally:
        store.set_experiment_status(spec.name, status)


def resume_sweep(name: str, *, address: str | None = None, store_url: str | None = None,
                 tracking_uri: str | None = None, console: Console | None = None) -> SweepOutcome:
    """Continue an interrupted sweep from the spec recorded in the store and Tune's saved state."""
    from peftlab.spec import parse_spec

    require_store(settings.store_url(store_url))
    record = ResultsStore(settings.store_url(store_url)).get_experiment(name)
    if record is None:
        raise UserError(f"no experiment named '{name}' in {settings.store_url(store_url)}")
    spec = parse_spec(record.spec, source=f"experiment {name}")
    return run_sweep(spec, address=address, store_url=store_url, tracking_uri=tracking_uri,
                     console=console, resume=True)


def sizes_of(fits: list[BudgetFit]) -> dict[str, dict[str, dict]]:
    """task label -> method -> its size hyperparameter at the budget."""
    sizes: dict[str, dict[str, dict]] = {}
    for fit in fits:
        if fit.size:
            sizes.setdefault(fit.task, {})[fit.method] = fit.size
    return sizes


def outcome_of(store: ResultsStore, name: str) -> SweepOutcome:
    counts: dict[str, int] = {}
    for trial in store.trials(name):
        counts[trial.status.value] = counts.get(trial.status.value, 0) + 1
    return SweepOutcome(name, counts, store.leaderboard(name))
