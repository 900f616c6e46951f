"""Using what a sweep found: find a method's best trial and its saved adapter, load it onto its base
model, and `peftlab export` it as a folder (adapter and model card, or a merged plain model)."""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from torch import nn

from peftlab import settings
from peftlab.errors import UserError
from peftlab.spec import ExperimentSpec, TaskSpec
from peftlab.store import LeaderboardRow, ResultsStore, TrialRecord


def best_row(store: ResultsStore, experiment: str, method: str, task: str | None) -> LeaderboardRow:
    """The leaderboard row of `method` (on `task`, which may be left out when there is one)."""
    if store.get_experiment(experiment) is None:
        known = ", ".join(e.name for e in store.experiments()) or "none"
        raise UserError(f"no experiment named '{experiment}' (known: {known})")
    rows = store.leaderboard(experiment)
    ran = sorted({row.method for row in rows})
    mine = [row for row in rows if row.method == method]
    if not mine:
        raise UserError(f"experiment '{experiment}' has no finished trial of method '{method}' "
                        f"(finished: {', '.join(ran) or 'none'})")
    if task is not None:
        mine = [row for row in mine if row.task == task]
        if not mine:
            raise UserError(f"method '{method}' has no finished trial on task '{task}' in '{experiment}'")
    if len(mine) > 1:
        raise UserError(f"method '{method}' ran on several tasks of '{experiment}': choose one with --task "
                        f"({', '.join(row.task for row in mine)})")
    return mine[0]


def adapter_folder(experiment: str, trial_id: str) -> Path:
    """The trial's saved adapter under this machine's PEFTLAB_HOME; refused if it is not there."""
    from peftlab.workers.trial import adapter_path

    folder = adapter_path(settings.adapters_dir(), experiment, trial_id)
    if not folder.is_dir() or not any(folder.iterdir()):
        raise UserError(f"the adapter of trial {trial_id} is not at {folder} (trained on another node? its "
                        "MLflow run holds a copy under `adapter`)")
    return folder


def model_card(trial: TrialRecord, spec: dict, metric: str) -> str:
    """README.md of an exported adapter: what it adapts, how it was found and how it scores."""
    hparams = "\n".join(f"| {name} | {value} |" for name, value in sorted(trial.hparams.items())) or "| - | - |"
    metrics = "\n".join(f"| {name} | {value:.4f} |" for name, value in sorted(trial.final_metrics.items())
                        if isinstance(value, (int, float)) and name != "step") or "| - | - |"
    budget = spec.get("budget")
    return f"""# {trial.method} adapter for {trial.model}

Found by peftlab {metadata.version("peftlab")}: the best trial of method `{trial.method}` (by `{metric}`,
chosen on the validation split) in experiment `{trial.experiment}`, trial `{trial.trial_id}`, seed
{trial.seed}, {trial.steps} steps ({trial.status.value.lower()}); this adapter is the checkpoint it
kept, at step {trial.final_metrics.get("step", "-")}.

- base model: `{trial.model}`
- task: `{trial.task}` (dataset `{trial.dataset}`, domain `{trial.domain or '-'}`)
- trainable parameters: {trial.trainable_params:,} of {trial.total_params:,} ({trial.trainable_pct:.3f}%)
- parameter budget: {budget if budget is not None else 'none'}

## Hyperparameters

| name | value |
|---|---|
{hparams}

## Metrics of this checkpoint (validation: what the search saw; test: held out, scored once)

| metric | value |
|---|---|
{metrics}

## Loading

With peftlab installed: `get_method("{trial.method}").load(base_model, folder)` on the base model
loaded with the task's head (`peftlab.workers.tasks.task_kind(...).load_model`); a folder exported
with `--merge` is a plain Hugging Face model (`from_pretrained`).
"""


def export(store: ResultsStore, experiment: str, method: str, out: Path, *, task: str | None = None,
           merge: bool = False) -> Path:
    """Write the export into `out` (which must not exist yet); nothing is left behind on error."""
    from peftlab.workers.methods import get_method

    if out.exists():
        raise UserError(f"{out} already exists: choose a new folder for the export")
    registered = get_method(method)
    if merge and not registered.mergeable:
        raise UserError(f"method '{method}' is not mergeable: export it without --merge")
    if merge and registered.prunes:
        # A pruned model has fewer heads or neurons in some layers than its config says.
        raise UserError(f"method '{method}' prunes the model, whose layers a Hugging Face config can no longer "
                        "describe: export it without --merge (the adapter reloads with `peftlab eval`)")
    row = best_row(store, experiment, method, task)
    trial = store.get_trial(experiment, row.trial_id)
    record = store.get_experiment(experiment)
    source = adapter_folder(experiment, row.trial_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if merge:
            _merged(record.spec, trial, registered, source, staging)
        else:
            shutil.copytree(source, staging, dirs_exist_ok=True)
        (staging / "README.md").write_text(model_card(trial, record.spec, record.metric))
        (staging / "peftlab-export.json").write_text(json.dumps(
            {"experiment": experiment, "trial_id": trial.trial_id, "method": method, "task": trial.task,
             "merged": merge, "hparams": trial.hparams}, indent=2, sort_keys=True))
        staging.chmod(0o755)  # mkdtemp's folder is private; the export is an ordinary folder
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


@dataclass
class Adapted:
    """A trial's adapter loaded onto its base model, with what scoring it needs."""

    model: nn.Module
    processor: Any
    kind: Any
    """The task type (peftlab.workers.tasks.TaskKind)."""
    head: tuple[str, ...]
    task: TaskSpec
    data: Any
    spec: ExperimentSpec


def trial_task(spec: dict, trial: TrialRecord) -> tuple[ExperimentSpec, TaskSpec]:
    """The experiment's spec as recorded, and the trial's task in it."""
    from peftlab.spec import parse_stored_spec

    parsed = parse_stored_spec(spec)
    own = next((t for t in parsed.tasks if t.label == trial.task), None)
    if own is None:
        raise UserError(f"the experiment's spec has no task '{trial.task}'")
    return parsed, own


def load_adapted(spec: dict, trial: TrialRecord, method, adapter: Path, *, task: TaskSpec | None = None,
                 data: Any = None) -> Adapted:
    """The trial's base model as its trial loaded it (dtype, quantization, head for its labels), with
    the saved adapter on it; `task` replaces the trial's own task (another data set of the same
    type), `data` is that task's data where the caller already loaded it."""
    import transformers

    from peftlab.workers.models import LoadOptions
    from peftlab.workers.tasks import task_kind

    # A command's output, not a training log: no per-load progress bars or reports of the new head.
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    parsed, own = trial_task(spec, trial)
    kind, data_dir = task_kind(own.type), settings.data_dir()
    if data is None:
        data = kind.load_data(task or own, data_dir)
    options = LoadOptions(parsed.model_dtype, parsed.quantization)
    base, processor = kind.load_model(parsed.model_for(own), data, data_dir, options)
    head = kind.head_modules(base)
    return Adapted(method.load(base, adapter), processor, kind, head, task or own, data, parsed)


def _merged(spec: dict, trial: TrialRecord, method, adapter: Path, folder: Path) -> None:
    """The base model with the trial's adapter folded into its weights, saved by transformers."""
    adapted = load_adapted(spec, trial, method, adapter)
    merged = method.merge(adapted.model)
    if not hasattr(merged, "save_pretrained"):
        raise UserError(f"{trial.model} is not a Hugging Face model: export it without --merge")
    merged.save_pretrained(str(folder))
    if adapted.processor is not None and hasattr(adapted.processor, "save_pretrained"):
        adapted.processor.save_pretrained(str(folder))
