"""The experiment spec: pydantic models of the YAML file and the checks that need the registry.

`load_spec` turns a file into a validated `ExperimentSpec` or raises one `SpecError` listing
every problem with its key path; nothing here runs code from the spec.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from peftlab.errors import SpecError, UserError
from peftlab.search_space import Leaf, parse_leaf

TASK_METRICS = ("accuracy", "macro_f1", "loss")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskSpec(_Strict):
    """One task: a dataset, how to read it, and how to score it."""

    type: Literal["text-classification"] = "text-classification"
    """The task type; decides the model head and the training objective."""
    dataset: str
    """A registry name (sst2, banking77, fomc), a local .csv/.tsv/.jsonl file, or a Hub dataset id."""
    name: str | None = None
    """Name of the task in results; defaults to the dataset's name."""
    domain: str | None = None
    """Domain tag such as nlp/sentiment; registry datasets bring their own."""
    metric: Literal["accuracy", "macro_f1"] | None = None
    """Task metric; registry datasets bring their own, files default to accuracy."""
    text_column: str = "text"
    """Column holding the input text (files and Hub datasets)."""
    label_column: str = "label"
    """Column holding the label: integers or strings."""
    max_train_samples: Annotated[int, Field(ge=1)] | None = None
    """Use at most this many training examples (a seeded, deterministic subset)."""
    max_eval_samples: Annotated[int, Field(ge=1)] | None = None
    """Use at most this many evaluation examples."""
    eval_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1
    """Share of the data held out for evaluation when the source has no eval split."""

    @property
    def label(self) -> str:
        return self.name or Path(self.dataset).stem.replace("/", "-")


class SearchSpec(_Strict):
    """How trials are chosen and stopped."""

    algorithm: Literal["random", "grid", "optuna"] = "random"
    """random: balanced over methods; grid: every combination of list values; optuna: TPE."""
    num_samples: Annotated[int, Field(ge=1)] | None = None
    """Configurations per task (random, optuna; default 4) or repetitions of the grid (grid; default 1)."""
    scheduler: Literal["fifo", "asha"] = "asha"
    """fifo runs every trial to the end; asha stops the weak ones at evaluations."""
    metric: str | None = None
    """Metric to optimise, e.g. eval/accuracy; defaults to eval/<task metric>."""
    mode: Literal["max", "min"] | None = None
    """max or min; defaults to min for losses, max otherwise."""
    max_concurrent: int | None = None
    """Trials running at once; defaults to the cluster's CPUs / cpus_per_trial."""
    grace_period: Annotated[int, Field(ge=1)] = 1
    """ASHA: evaluations every trial gets before it may be stopped."""
    reduction_factor: Annotated[int, Field(ge=2)] = 2
    """ASHA: keep the top 1/reduction_factor at each rung."""
    seed: int = 0
    """Seed of the search algorithm (sampling is reproducible)."""

    @property
    def samples(self) -> int:
        return self.num_samples or (1 if self.algorithm == "grid" else 4)

    @field_validator("max_concurrent")
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"must be at least 1, got {value}")
        return value


class TrainingSpec(_Strict):
    """The training loop's settings, shared by every trial."""

    max_steps: Annotated[int, Field(ge=1)] = 300
    """Optimizer steps per trial."""
    batch_size: Annotated[int, Field(ge=1)] = 32
    """Training examples per step."""
    eval_batch_size: Annotated[int, Field(ge=1)] = 128
    """Examples per evaluation forward pass."""
    eval_every: Annotated[int, Field(ge=1)] = 50
    """Evaluate (and report to the scheduler) every this many steps, and at the end."""
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.06
    """Share of steps with linearly rising learning rate; then linear decay to zero."""
    max_grad_norm: Annotated[float, Field(gt=0)] = 1.0
    """Gradient clipping norm."""
    max_length: Annotated[int, Field(ge=8)] = 128
    """Tokens per example after truncation."""
    seeds: Annotated[list[int], Field(min_length=1)] = [0]
    """Every sampled configuration runs once per seed."""


class ResourcesSpec(_Strict):
    """What one trial asks of the cluster."""

    cpus_per_trial: Annotated[float, Field(gt=0)] = 1
    """CPUs reserved per trial (also torch's thread count)."""
    gpus_per_trial: Annotated[float, Field(ge=0)] = 0
    """GPUs reserved per trial."""
    workers_per_trial: Literal[1] = 1
    """Processes per trial; only single-process trials are supported."""


class ExperimentSpec(_Strict):
    """A whole experiment: model, tasks, methods with their search spaces, search, training."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")]
    """Experiment name: letters, digits, '-', '_', '.'; the key in MLflow and the store."""
    description: str | None = None
    """Free text shown with the experiment."""
    model: str = "minilm"
    """Registry alias (minilm), a Hugging Face Hub id, or a local path."""
    tasks: Annotated[list[TaskSpec], Field(min_length=1)]
    """Tasks to run; each gets its own search."""
    methods: Annotated[dict[str, dict[str, Any]], Field(min_length=1)]
    """Method name -> its hyperparameters: fixed values, lists (choice) or ranges."""
    search: SearchSpec = SearchSpec()
    training: TrainingSpec = TrainingSpec()
    resources: ResourcesSpec = ResourcesSpec()

    def metric_for(self, task: TaskSpec) -> str:
        return self.search.metric or f"eval/{task.metric}"

    def mode_for(self, task: TaskSpec) -> str:
        if self.search.mode:
            return self.search.mode
        return "min" if self.metric_for(task).endswith("loss") else "max"

    def spec_hash(self) -> str:
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class MethodSpace:
    """One method's parsed search space: hyperparameter -> leaf (fixed, choice or range)."""

    method: str
    leaves: dict[str, Leaf]


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _pydantic_problems(error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors():
        if item["type"] == "extra_forbidden":
            problems.append(f"{_path(item['loc'])}: unknown key")
            continue
        loc = tuple(p for p in item["loc"] if not (isinstance(p, str) and "[" in p))
        message = re.sub(r"^Value error, ", "", item["msg"])
        problems.append(f"{_path(loc)}: {message}")
    return problems


def method_spaces(spec: ExperimentSpec | dict) -> tuple[dict[str, MethodSpace], list[str]]:
    """Parse every method's block (of a spec or a raw `methods` mapping) against the registry."""
    from peftlab.workers.methods import all_methods

    registry = all_methods()
    owners: dict[str, list[str]] = {}
    for method in registry.values():
        for hp in method.hparams:
            owners.setdefault(hp.name, []).append(method.name)

    methods = spec.methods if isinstance(spec, ExperimentSpec) else spec
    spaces, problems = {}, []
    for name, block in methods.items():
        where = f"methods.{name}"
        if name not in registry:
            problems.append(f"{where}: unknown method '{name}' (known: {', '.join(sorted(registry))})")
            continue
        if not isinstance(block, dict):
            problems.append(f"{where}: expected a mapping of hyperparameters, got {type(block).__name__}")
            continue
        known = registry[name].all_hparams()
        leaves: dict[str, Leaf] = {}
        for key, raw in (block or {}).items():
            if key not in known:
                others = [m for m in owners.get(key, []) if m != name]
                hint = (f"'{key}' belongs to {', '.join(others)}, not {name}" if others
                        else f"unknown hyperparameter for {name}")
                problems.append(f"{where}.{key}: {hint} (known: {', '.join(sorted(known))})")
                continue
            try:
                leaves[key] = parse_leaf(raw, known[key])
            except UserError as exc:
                problems.append(f"{where}.{key}: {exc}")
        spaces[name] = MethodSpace(method=name, leaves=leaves)
    return spaces, problems


def _semantic_problems(spec: ExperimentSpec) -> list[str]:
    problems = []
    for i, task in enumerate(spec.tasks):
        metric = spec.metric_for(task)
        if metric.removeprefix("eval/") not in TASK_METRICS or not metric.startswith("eval/"):
            allowed = ", ".join(f"eval/{m}" for m in TASK_METRICS)
            problems.append(f"search.metric: '{metric}' is not reported by tasks[{i}] (one of {allowed})")
    labels = [task.label for task in spec.tasks]
    for label in {lbl for lbl in labels if labels.count(lbl) > 1}:
        problems.append(f"tasks: two tasks are named '{label}'; give them distinct `name`s")
    if spec.search.algorithm == "grid":
        problems += _grid_problems(spec)
    return problems


def _grid_problems(spec: ExperimentSpec) -> list[str]:
    spaces, _ = method_spaces(spec)
    return [
        f"methods.{space.method}.{key}: grid search needs fixed values or lists, not {leaf.kind}"
        for space in spaces.values()
        for key, leaf in space.leaves.items()
        if leaf.kind not in ("fixed", "choice")
    ]


def parse_spec(data: Any, *, source: str | None = None) -> ExperimentSpec:
    """Validate a parsed YAML document; raises SpecError with every problem found."""
    if not isinstance(data, dict):
        raise SpecError([f"the spec must be a YAML mapping, got {type(data).__name__}"], source=source)
    try:
        spec = ExperimentSpec.model_validate(data)
    except ValidationError as exc:
        problems = _pydantic_problems(exc)
        if isinstance(data.get("methods"), dict):  # report method problems in the same pass
            problems += method_spaces(data["methods"])[1]
        raise SpecError(list(dict.fromkeys(problems)), source=source) from None
    spec = spec.model_copy(update={"tasks": [_with_registry_defaults(t) for t in spec.tasks]})
    _, problems = method_spaces(spec)
    problems += _semantic_problems(spec)
    if problems:
        raise SpecError(list(dict.fromkeys(problems)), source=source)
    return spec


def _with_registry_defaults(task: TaskSpec) -> TaskSpec:
    """Registry datasets bring their domain and metric; files default to accuracy."""
    from peftlab.workers.data import DATASETS

    info = DATASETS.get(task.dataset)
    return task.model_copy(update={
        "domain": task.domain or (info.domain if info else None),
        "metric": task.metric or (info.metric if info else "accuracy"),
    })


def load_spec(path: str | Path) -> ExperimentSpec:
    """Read and validate a YAML spec file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"spec file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"invalid YAML{where}: {reason}", where=str(path)) from None
    return parse_spec(data, source=str(path))
