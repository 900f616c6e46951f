"""`peftlab eval` and `peftlab predict`: a saved adapter on its base model, scored on a split of the
trial's own data (where it reproduces the stored numbers) or another data set with the same labels,
or predicting a label for each row of a file."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from peftlab import settings
from peftlab.errors import UserError
from peftlab.export import Adapted, adapter_folder, best_row, load_adapted, trial_task
from peftlab.spec import task_like
from peftlab.store import ResultsStore, TrialRecord


def chosen_trial(store: ResultsStore, experiment: str, *, trial_id: str | None, method: str | None,
                 task: str | None) -> TrialRecord:
    """The trial named by id, or the best trial of a method."""
    if (trial_id is None) == (method is None):
        raise UserError("name the adapter to score: --trial ID or --method M (one of them)")
    if trial_id is None:
        trial_id = best_row(store, experiment, method, task).trial_id
    elif store.get_experiment(experiment) is None:
        raise UserError(f"no experiment named '{experiment}'")
    trial = store.get_trial(experiment, trial_id)
    if trial is None:
        raise UserError(f"experiment '{experiment}' has no trial '{trial_id}'")
    return trial


@contextlib.contextmanager
def _on_device(adapted: Adapted):
    """The adapted model on the GPU where there is one, under the autocast its trial trained with."""
    from peftlab.workers.train import AUTOCAST_DTYPES

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = AUTOCAST_DTYPES.get(adapted.spec.training.precision)
    with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
        yield adapted.model.to(device), device


def score(store: ResultsStore, experiment: str, *, trial_id: str | None = None, method: str | None = None,
          task: str | None = None, dataset: str | None = None,
          split: str = "test") -> tuple[TrialRecord, dict[str, float]]:
    """The chosen trial and its metrics on a split ("validation" or "test") of its own data, or of
    `dataset`'s."""
    if split not in ("validation", "test"):
        raise UserError(f"--split must be validation or test, got '{split}'")
    from peftlab.workers.methods import get_method
    from peftlab.workers.tasks import task_kind

    trial = chosen_trial(store, experiment, trial_id=trial_id, method=method, task=task)
    adapter = adapter_folder(experiment, trial.trial_id)
    spec = store.get_experiment(experiment).spec
    other = data = None
    if dataset is not None:
        _, own = trial_task(spec, trial)
        other = task_like(own, dataset=dataset, name=None)
        kind = task_kind(own.type)
        data = kind.load_data(other, settings.data_dir())
        trained = getattr(kind.load_data(own, settings.data_dir()), "label_names", None)
        given = getattr(data, "label_names", None)
        if trained != given:
            raise UserError(f"dataset '{dataset}' has labels {given}; the adapter was trained on {trained}, and "
                            "a classifier can only be scored on the labels it learnt")
    adapted = load_adapted(spec, trial, get_method(trial.method), adapter, task=other, data=data)
    training = adapted.spec.training
    evaluation = adapted.kind.build_task(adapted.data, adapted.processor, adapted.head, adapted.task, training,
                                         settings.data_dir())
    with _on_device(adapted) as (model, device):
        return trial, evaluation.evaluate(model, training.eval_batch_size, device, split=split)


def predict(store: ResultsStore, experiment: str, path: Path, *, trial_id: str | None = None,
            method: str | None = None, task: str | None = None) -> tuple[TrialRecord, list[dict]]:
    """The chosen trial and one prediction per row of the file at `path`."""
    from peftlab.workers.methods import get_method
    from peftlab.workers.tasks import task_kind

    trial = chosen_trial(store, experiment, trial_id=trial_id, method=method, task=task)
    adapter = adapter_folder(experiment, trial.trial_id)
    spec = store.get_experiment(experiment).spec
    _, own = trial_task(spec, trial)
    inputs = task_kind(own.type).prediction_inputs(own, path)  # a bad file is refused before the model loads
    adapted = load_adapted(spec, trial, get_method(trial.method), adapter)
    with _on_device(adapted) as (model, _):
        return trial, adapted.kind.predict(model, adapted.processor, adapted.data, adapted.task,
                                           adapted.spec.training, inputs)
