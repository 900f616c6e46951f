"""One trial's lifecycle, as a Ray Tune function trainable: resolve, apply, train, save, report.

The trial reads only its own config (method, that method's hyperparameters, seed) and the
shared `TrialContext`; everything it measures goes back through `tune.report`.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from peftlab.workers.report import Costs, Outcome, TrialReport
from peftlab.spec import QuantizationSpec, TaskSpec, TrainingSpec

SEED_INDEX = "__trial_index__"  # set by Tune's Repeater on each repeat of an Optuna config


@dataclass(frozen=True)
class TrialContext:
    """What every trial of one task shares; travels to workers through Ray's object store."""

    experiment: str
    model: str
    task: TaskSpec
    training: TrainingSpec
    adapters_dir: str
    data_dir: str | None
    cpus: float
    gpus: float
    model_dtype: str = "float32"
    quantization: QuantizationSpec | None = None
    tracking_uri: str | None = None
    """A tracking server's URI: the trial uploads its adapter to its MLflow run there itself."""
    driver_node: str | None = None
    """The driver's Ray node: Tune keeps checkpoints in the driver's local storage, which only
    trials on that node can write (elsewhere Ray refuses it, and a retry starts afresh)."""
    shared_storage: bool = False
    """The Ray storage is a folder every node mounts (PEFTLAB_RAY_STORAGE): trials on any node checkpoint."""
    metric: str = "validation/loss"
    """The search metric: what `training.select` and the rungs compare."""
    mode: str = "min"
    rungs: Any = None
    """The task's RungPlan (rungs.py), None when every trial trains to its end."""
    rung_board: str | None = None
    """The Ray actor name of the task's RungBoard."""

    def checkpoint_owner(self, trial_id: str) -> dict[str, str]:
        """The record beside a trial's checkpoints: only this trial of this experiment restores them."""
        return {"experiment": self.experiment, "trial_id": trial_id}

    def can_checkpoint(self, nodes: list[str]) -> bool:
        """Whether a trial whose processes run on these nodes can write checkpoints to the storage."""
        return self.shared_storage or self.driver_node is None or all(node == self.driver_node for node in nodes)
    finished: dict[str, str] = field(default_factory=dict)
    """Trial id -> its status in the store, for trials that finished before Tune's state was last
    saved: after a restore Tune starts them again, and they must not train twice."""


def replay_if_finished(context: TrialContext, trial_id: str, report) -> bool:
    """For a trial the store has as finished: report only how it ended (no training) and return
    True; a failed one fails again, with no new attempt."""
    status = context.finished.get(trial_id)
    if status is None:
        return False
    if status == "FAILED":
        raise RuntimeError(f"trial {trial_id} failed before the sweep was restored; it is not run again")
    outcome = Outcome.COMPLETED if status == "COMPLETED" else Outcome.EARLY_STOPPED
    report(TrialReport(step=0, max_steps=context.training.max_steps, costs=Costs(0, 0), outcome=outcome))
    return True


def seed_of(config: dict, seeds: list[int]) -> int:
    """The trial's training seed, whether set directly or by the Repeater's index."""
    return config["seed"] if "seed" in config else seeds[config.get(SEED_INDEX, 0)]


def hparams_of(config: dict) -> dict[str, Any]:
    """Only the trial's own method's hyperparameters."""
    return dict(config.get(config["method"], {}))


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each block's activations in the backward pass. The non-reentrant variant needs no
    input that requires a gradient, so it works with a frozen embedding, and it replays dropout's
    random state, so gradients equal those without it."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if getattr(model.config, "use_cache", False):
        model.config.use_cache = False  # a key/value cache is for generation, and conflicts with recompute


@dataclass
class PreparedTrial:
    """Everything a trial trains, built from its config and the shared context."""

    method: Any
    hparams: dict[str, Any]
    seed: int
    model: torch.nn.Module
    task: Any
    settings: Any
    device: torch.device
    static: Costs
    """Counts known before training, reported with every result."""
    figures: dict[str, float] = field(default_factory=dict)
    """What calibration measured and the untouched model's bias scores, reported with the last result."""
    final_evaluation: Callable[[torch.nn.Module, torch.device], dict[str, float]] | None = None
    """The kept checkpoint's bias scores, where the task asks for them."""

    def reshaping(self):
        return reshaping_of(self.method, self.model, self.settings.max_steps)


def reshaping_of(method, model: torch.nn.Module, max_steps: int):
    """The loop's view of a method that calibrates on the data or prunes while it trains
    (train.Reshaping); None for the others."""
    from peftlab.workers.train import Reshaping

    if not (method.prunes or method.calibrates):
        return None
    at = method.prune_step(model, max_steps)

    def frozen() -> dict[str, torch.Tensor]:
        return {n: t for n, t in model.state_dict().items() if method.saved_frozen and n.endswith(method.saved_frozen)}

    return Reshaping(prune=lambda step: method.prune(model) if step == at else None,
                     structure=lambda: method.structure(model),
                     restructure=lambda structure: method.restructure(model, structure),
                     frozen=frozen, restore_frozen=lambda tensors: model.load_state_dict(tensors, strict=False))


def prepare_trial(config: dict, context: TrialContext, *, calibrate: bool = True) -> PreparedTrial:
    """Seed, load data and model, remember the untouched model for retention, apply the method and
    calibrate it (not for a trial resumed from a checkpoint, which holds what calibration decided)."""
    import numpy as np

    from peftlab.workers.methods import Calibration, TaskInfo, get_method
    from peftlab.workers.models import LoadOptions
    from peftlab.workers.tasks import task_kind
    from peftlab.workers.train import LoopSettings, count_parameters, is_quantized

    method = get_method(config["method"])
    hparams = method.resolve(hparams_of(config))
    seed = seed_of(config, context.training.seeds)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, int(context.cpus)))
    device = torch.device("cuda" if context.gpus > 0 and torch.cuda.is_available() else "cpu")

    spec, kind = context.task, task_kind(context.task.type)
    data_dir = Path(context.data_dir) if context.data_dir else None
    data = kind.load_data(spec, data_dir)
    training = context.training
    model, processor = kind.load_model(context.model, data, data_dir,
                                       LoadOptions(context.model_dtype, context.quantization))
    head = kind.head_modules(model)
    _, total_params = count_parameters(model)
    task = kind.build_task(data, processor, head, spec, training, data_dir)
    task.remember(model, device)
    final_evaluation, figures = None, {}
    if spec.bias_eval:
        from peftlab.workers.bias import LM_EVALS, bias_scores

        trained_on = set(kind.corpus(data))

        def final_evaluation(adapted: torch.nn.Module, on: torch.device, prefix: str = "bias/",
                             evals: list[str] = spec.bias_eval) -> dict[str, float]:
            # One sample (seed 0) for every trial and seed of the task, so their scores compare.
            scores = bias_scores(evals, adapted, processor, context.model, device=on, seed=0,
                                 limit=spec.bias_samples, data_dir=data_dir, max_length=training.max_length,
                                 trained_on=trained_on)
            return {prefix + name: value for name, value in scores.items()}

        # The untouched model's scores, where they mean something: BBQ reads answers through the
        # task's new head, which the untouched model has only at its random start.
        untouched = [e for e in spec.bias_eval if e in LM_EVALS]
        if untouched:
            figures = final_evaluation(model if is_quantized(model) else model.to(device), device,
                                       prefix="bias_base/", evals=untouched)
    if context.quantization is not None:
        from peft import prepare_model_for_kbit_training

        # Freezes the quantized base, keeps norms in fp32 and lets gradients reach the adapters.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=training.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif training.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model = method.apply(model, hparams, TaskInfo(spec.type, data.num_labels, head))
    calibration_seconds = 0.0
    if method.calibrates and calibrate:
        started = time.perf_counter()
        model.to(device)
        # Its own seeded stream: the training batches that follow are those of any other method.
        figures |= method.calibrate(model, Calibration(
            batches=task.train_batches(training.batch_size, seed + 1), device=device, texts=kind.corpus(data),
            processor=processor, model_name=context.model, seed=seed,
            max_length=training.max_length))
        calibration_seconds = time.perf_counter() - started
    trainable_params, _ = count_parameters(model)

    settings = LoopSettings(
        max_steps=training.max_steps, batch_size=training.batch_size,
        eval_batch_size=training.eval_batch_size, eval_every=training.eval_every,
        warmup_ratio=training.warmup_ratio, max_grad_norm=training.max_grad_norm,
        lr=hparams.get("lr", method.default_lr), weight_decay=hparams.get("weight_decay", 0.0),
        log_every=training.log_every, precision=training.precision,
        accumulation=training.gradient_accumulation_steps, select=training.select,
        metric=context.metric.split("/", 1)[-1], mode=context.mode,
    )
    static = Costs(trainable_params=trainable_params, total_params=total_params,
                   calibration_seconds=calibration_seconds)
    return PreparedTrial(method, hparams, seed, model, task, settings, device, static, figures, final_evaluation)


def rungs_for(context: TrialContext, trial_id: str):
    """The loop's rung gate for this trial, or None when the task has no rungs."""
    if context.rungs is None or context.rung_board is None:
        return None
    from peftlab.workers.rungs import rung_gate

    return rung_gate(context.rungs, context.rung_board, trial_id)


def adapter_path(adapters_dir: Path, experiment: str, trial_id: str) -> Path:
    """Where a trial's adapter lives under an adapters folder."""
    return adapters_dir / experiment / trial_id


def adapter_dir_of(context: TrialContext, trial_id: str) -> Path:
    """Under the PEFTLAB_HOME of the node the trial runs on where that node sets one (nodes need no
    shared filesystem), else under the driver's."""
    from peftlab import settings

    root = settings.adapters_dir() if os.environ.get(settings.ENV_HOME) else Path(context.adapters_dir)
    return adapter_path(root, context.experiment, trial_id)


UPLOAD_WAIT_S = 60


def publisher(context: TrialContext, trial_id: str):
    """With a tracking server: a function that uploads the adapter folder to this trial's MLflow
    run and returns its runs:/ URI. A local tracking database is the driver's to write."""
    uri = context.tracking_uri
    if not uri or not uri.startswith(("http://", "https://")):
        return None

    def publish(folder: Path) -> str:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(context.experiment)
        # The driver creates the run as the trial starts; a trial that outran it waits for it.
        deadline = time.monotonic() + UPLOAD_WAIT_S
        while True:
            runs = [] if experiment is None else client.search_runs(
                [experiment.experiment_id], filter_string=f"tags.`peftlab.trial_id` = '{trial_id}'", max_results=1)
            if runs or time.monotonic() > deadline:
                break
            time.sleep(1)
            experiment = experiment or client.get_experiment_by_name(context.experiment)
        if not runs:
            raise RuntimeError(f"no MLflow run for trial {trial_id} at {uri} to upload its adapter to")
        run_id = runs[0].info.run_id
        client.log_artifacts(run_id, str(folder), artifact_path="adapter")
        return f"runs:/{run_id}/adapter"

    return publish


FAILURE_FILE = "peftlab-failure.json"


def _deterministic_errors() -> dict[str, type[Exception]]:
    from peftlab.errors import UserError
    from peftlab.workers.train import NonFiniteLoss

    return {"NonFiniteLoss": NonFiniteLoss, "UserError": UserError}


@contextlib.contextmanager
def failures_recorded(trial_dir: Path) -> Iterator[None]:
    """Tune retries every failed trial (search.max_failures), but a diverged loss or a bad input
    fails the same way again: such a failure is written beside the trial, and its retry raises it at
    once instead of training again."""
    known = _deterministic_errors()
    marker = trial_dir / FAILURE_FILE
    if marker.is_file():
        found = json.loads(marker.read_text())
        raise known.get(found.get("type"), RuntimeError)(str(found.get("message")))
    try:
        yield
    except tuple(known.values()) as exc:
        kind = next(name for name, cls in known.items() if isinstance(exc, cls))
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"type": kind, "message": str(exc)}))
        raise


def checkpoint_reporter(owner: dict[str, str], report: Callable[..., None], checkpoint_type: type, *,
                        rank: int = 0):
    """Report an evaluation (to Tune, or Ray Train for a multi-worker trial's ranks: `report` and
    its `checkpoint_type`) with a folder into which the loop wrote this process's trainable state;
    rank 0 signs it for the trial."""
    from peftlab.workers import checkpoint

    def report_with(record: TrialReport, write: Callable[[Path], None]) -> None:
        folder = Path(tempfile.mkdtemp(prefix="peftlab-checkpoint-"))
        try:
            write(folder)
            if rank == 0:
                checkpoint.claim(folder, owner)
            # Persisted into the trial's storage before report returns (a multi-worker trial's
            # ranks all into one folder).
            report(record.to_result(), checkpoint=checkpoint_type.from_directory(str(folder)))
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    return report_with


@contextlib.contextmanager
def resumed_checkpoint(found, owner: dict[str, str]) -> Iterator[Path | None]:
    """The folder of the checkpoint Tune (or Ray Train) restarts the trial with, once its owner is
    checked to be this trial; None on a first start. It stays there while the trial runs."""
    from peftlab.workers import checkpoint

    if found is None:
        yield None
        return
    with found.as_directory() as folder:
        checkpoint.check_owner(Path(folder), owner)
        yield Path(folder)


def run_trial(config: dict, context: TrialContext) -> None:
    """The Tune function trainable of a one-process trial."""
    import ray
    from ray import tune

    from peftlab.workers.train import Stepper, TrialLoop

    trial_id = tune.get_context().get_trial_id()
    if replay_if_finished(context, trial_id, lambda record: tune.report(record.to_result())):
        return
    with failures_recorded(Path(tune.get_context().get_trial_dir())):
        owner = context.checkpoint_owner(trial_id)
        node = ray.get_runtime_context().get_node_id()
        here = context.can_checkpoint([node])
        # A retry placed where the storage cannot be reached starts from step 0.
        found = tune.get_checkpoint() if here else None
        trial = prepare_trial(config, context, calibrate=found is None)
        model, method = trial.model, trial.method
        stepper = Stepper(model, trial.settings, trial.device,
                          after_step=lambda step: method.on_step(model, step, trial.settings.max_steps))
        reporter = checkpoint_reporter(owner, tune.report, tune.Checkpoint) if here else None
        with resumed_checkpoint(found, owner) as resume:
            TrialLoop(task=trial.task, settings=trial.settings, stepper=stepper, seed=trial.seed, static=trial.static,
                      report=lambda record: tune.report(record.to_result()), save=method.save,
                      adapter_dir=adapter_dir_of(context, trial_id), node=node, publish=publisher(context, trial_id),
                      checkpoint=reporter, rungs=rungs_for(context, trial_id),
                      checkpoint_every=context.training.checkpoint_every, resume=resume,
                      reshaping=trial.reshaping(), figures=dict(trial.figures),
                      final_evaluation=trial.final_evaluation).train()
