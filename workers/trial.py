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


def run_trial(config: dict, context: TrialContext) -> None:
    import numpy as np
    import ray
    from ray import tune

    from peftlab.workers.data import load_text_classification
    from peftlab.workers.methods import TaskInfo, get_method
    from peftlab.workers.models import head_modules, load_classifier
    from peftlab.workers.tasks.text_classification import TextClassificationTask
    from peftlab.workers.train import LoopSettings, count_parameters, train

    method = get_method(config["method"])
    hparams = method.resolve(hparams_of(config))
    seed = seed_of(config, context.training.seeds)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, int(context.cpus)))
    device = torch.device("cuda" if context.gpus > 0 and torch.cuda.is_available() else "cpu")

    spec = context.task
    data = load_text_classification(
        spec.dataset, text_column=spec.text_column, label_column=spec.label_column,
        max_train_samples=spec.max_train_samples, max_eval_samples=spec.max_eval_samples,
        eval_fraction=spec.eval_fraction, data_dir=Path(context.data_dir) if context.data_dir else None,
    )
    model, tokenizer = load_classifier(context.model, data.num_labels)
    _, total_params = count_parameters(model)
    model = method.apply(model, hparams, TaskInfo(spec.type, data.num_labels, head_modules(model)))
    trainable_params, _ = count_parameters(model)
    task = TextClassificationTask(data, tokenizer, context.training.max_length)

    adapter_dir = Path(context.adapters_dir) / context.experiment / tune.get_context().get_trial_id()

    def save_adapter() -> dict:
        method.save(model, adapter_dir)
        return {"adapter_bytes": directory_bytes(adapter_dir), "adapter_path": str(adapter_dir)}

    static = {
        "trainable_params": trainable_params,
        "total_params": total_params,
        "trainable_pct": 100.0 * trainable_params / total_params,
        "node": ray.get_runtime_context().get_node_id(),
    }
    training = context.training
    settings = LoopSettings(
        max_steps=training.max_steps, batch_size=training.batch_size,
        eval_batch_size=training.eval_batch_size, eval_every=training.eval_every,
        warmup_ratio=training.warmup_ratio, max_grad_norm=training.max_grad_norm,
        lr=hparams.get("lr", method.default_lr), weight_decay=hparams.get("weight_decay", 0.0),
    )
    train(model, task, settings, seed=seed, device=device,
          report=lambda result: tune.report({**result, **static}),
          after_step=lambda step: method.on_step(model, step, settings.max_steps), on_last_step=save_adapter)
