"""One trial's lifecycle, as a Ray Tune function trainable: resolve, apply, train, save, report.

The trial reads only its own config (method, that method's hyperparameters, seed) and the
shared `TrialContext`; everything it measures goes back through `tune.report`.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peftlab.spec import TaskSpec, TrainingSpec

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


def seed_of(config: dict, seeds: list[int]) -> int:
    """The trial's training seed, whether set directly or by the Repeater's index."""
    return config["seed"] if "seed" in config else seeds[config.get(SEED_INDEX, 0)]


def hparams_of(config: dict) -> dict[str, Any]:
    """Only the trial's own method's hyperparameters."""
    return dict(config.get(config["method"], {}))


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


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
    static: dict[str, Any]
    """Counts known before training, reported with every result."""


def prepare_trial(config: dict, context: TrialContext) -> PreparedTrial:
    """Seed, load data and model, remember the untouched model for retention, apply the method."""
    import numpy as np

    from peftlab.workers.methods import TaskInfo, get_method
    from peftlab.workers.tasks import task_kind
    from peftlab.workers.train import LoopSettings, count_parameters

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
    model, processor = kind.load_model(context.model, data, data_dir)
    head = kind.head_modules(model)
    _, total_params = count_parameters(model)
    task = kind.build_task(data, processor, head, spec, context.training, data_dir)
    task.remember(model, device)
    model = method.apply(model, hparams, TaskInfo(spec.type, data.num_labels, head))
    trainable_params, _ = count_parameters(model)

    training = context.training
    settings = LoopSettings(
        max_steps=training.max_steps, batch_size=training.batch_size,
        eval_batch_size=training.eval_batch_size, eval_every=training.eval_every,
        warmup_ratio=training.warmup_ratio, max_grad_norm=training.max_grad_norm,
        lr=hparams.get("lr", method.default_lr), weight_decay=hparams.get("weight_decay", 0.0),
    )
    static = {
        "trainable_params": trainable_params,
        "total_params": total_params,
        "trainable_pct": 100.0 * trainable_params / total_params,
    }
    return PreparedTrial(method, hparams, seed, model, task, settings, device, static)


def run_trial(config: dict, context: TrialContext) -> None:
    import ray
    from ray import tune

    from peftlab.workers.train import train

    trial = prepare_trial(config, context)
    model, method, device = trial.model, trial.method, trial.device
    adapter_dir = Path(context.adapters_dir) / context.experiment / tune.get_context().get_trial_id()

    def finish() -> dict:
        method.save(model, adapter_dir)
        retention = {f"eval/{k}": v for k, v in trial.task.retention(model, device).items()}
        return {**retention, "adapter_bytes": directory_bytes(adapter_dir), "adapter_path": str(adapter_dir)}

    static = {**trial.static, "node": ray.get_runtime_context().get_node_id()}
    train(model, trial.task, trial.settings, seed=trial.seed, device=device,
          report=lambda result: tune.report({**result, **static}),
          after_step=lambda step: method.on_step(model, step, trial.settings.max_steps), on_last_step=finish)
