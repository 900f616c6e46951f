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
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, SerializeAsAny, ValidationError,
                      field_validator, model_validator)

from peftlab.errors import SpecError, UserError
from peftlab.search_space import Leaf, parse_leaf

SPLIT_PREFIXES = ("validation/", "test/")
SEARCH_PREFIX = "validation/"
"""Searches, schedulers and every "best" read validation metrics only."""
MINIMISED = ("loss", "perplexity")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"
MAX_TRIALS = 10_000
"""The most trials one task's plan may hold (the search, then the seed re-runs): more is a typo,
and a plan is built in memory."""
MAX_SEEDS = 1000
"""Experiment and task names: they name MLflow experiments, store rows and state folders."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskSpec(_Strict):
    """What every task has: a type, a dataset, its splits and how it is scored. Each task type
    extends it with its own fields (workers/tasks: `TaskKind.spec_model`); a task in a spec is
    validated against its type's model."""

    type: str = "text-classification"
    """The task type (text-classification, image-classification, causal-lm, multiple-choice: the
    registry in workers/tasks); decides the model class, the head, the objective, the metrics and
    the type's own keys."""
    dataset: str
    """A registry name of the task type (sst2, banking77, fomc, pneumoniamnist, bbq, ...), a local
    file, or a Hub dataset id."""
    model: str | None = None
    """This task's model; defaults to the experiment's `model`, else the task type's default."""
    methods: Annotated[list[str], Field(min_length=1)] | None = None
    """The experiment's methods to run on this task (default: all of them)."""
    name: Annotated[str, Field(pattern=NAME_PATTERN)] | None = None
    """Name of the task in results (letters, digits, '-', '_', '.'); defaults to the dataset's name."""
    domain: str | None = None
    """Domain tag such as nlp/sentiment; registry datasets bring their own."""
    metric: str | None = None
    """Task metric, one the task type reports; registry datasets bring their own, else the type's default."""
    retention: bool = True
    """Report a retention measure at the end of each trial: validation/drift (classifiers: 1 - cosine
    similarity of representations of validation examples to the base model's) or
    validation/forgetting (causal-lm: the loss change on reference texts)."""
    retention_samples: Annotated[int, Field(ge=1, le=100_000)] = 256
    """Reference examples used for drift / forgetting."""
    max_train_samples: Annotated[int, Field(ge=1)] | None = None
    """Use at most this many training examples (a seeded, deterministic subset)."""
    max_eval_samples: Annotated[int, Field(ge=1)] | None = None
    """Use at most this many validation examples, and as many test examples (seeded subsets)."""
    validation_file: str | None = None
    """A local file (same columns) to validate on instead of a carve-out of the training rows."""
    test_file: str | None = None
    """A local file (same columns) to test on instead of a carve-out of the training rows."""
    bias_eval: Annotated[list[Literal["crows_pairs", "winobias", "bbq"]], Field(min_length=1)] | None = None
    """Bias evaluations of each trial's kept checkpoint and of the untouched model, reported as
    bias/<score> and bias_base/<score>: crows_pairs (CrowS-Pairs stereotype score, 50 unbiased) and
    winobias (WinoBias pro/anti likelihood gap) need a trained language-modelling head; bbq (BBQ
    accuracy and bias score, ambiguous and disambiguated) a multiple-choice task."""
    bias_samples: Annotated[int, Field(ge=1, le=100_000)] | None = 500
    """Examples drawn (seeded) from each bias data set; null scores the whole sets."""
    validation_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1
    """Share of the training rows carved out (stratified, fixed seed) for validation when the source
    has no validation split."""
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1
    """Share of the training rows carved out (stratified, fixed seed) for test when the source has
    no test split (carved before validation)."""

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "eval_fraction" in data:
            raise ValueError("`eval_fraction` is now `validation_fraction` (test has its own split or "
                             "`test_fraction`)")
        return data

    @property
    def label(self) -> str:
        return self.name or Path(self.dataset).stem.replace("/", "-")


def typed_task(data: Any) -> Any:
    """A task mapping validated against its type's own model (unknown keys of that type refused)."""
    if not isinstance(data, dict):
        return data
    from peftlab.workers.tasks import KINDS

    kind = data.get("type", TaskSpec.model_fields["type"].default)
    if kind not in KINDS:
        raise ValueError(f"type: unknown task type {kind!r} (known: {', '.join(KINDS)})")
    return KINDS[kind].spec_model.model_validate(data)


def task_like(task: TaskSpec, **changes: Any) -> TaskSpec:
    """The task with some fields changed, validated again by its type's model."""
    return type(task).model_validate({**task.model_dump(), **changes})


class SearchSpec(_Strict):
    """How trials are chosen and stopped."""

    algorithm: Literal["random", "grid", "optuna"] = "random"
    """random: balanced over methods; grid: every combination of list values; optuna: TPE."""
    num_samples: Annotated[int, Field(ge=1, le=MAX_TRIALS)] | None = None
    """Configurations per task (random, optuna; default 4) or repetitions of the grid (grid; default 1)."""
    per_method: bool = False
    """random, optuna: `num_samples` configurations for each of a task's methods, instead of in all."""
    scheduler: Literal["fifo", "asha"] = "asha"
    """fifo runs every trial to the end; asha stops the weak ones at rungs (successive halving,
    decided in trial order, so the same on a busy or an idle machine)."""
    rung_groups: Literal["method", "all"] = "method"
    """ASHA: compare a trial at a rung with the earlier trials of its own method (method) or with
    every earlier trial (all)."""
    metric: str | None = None
    """Validation metric to optimise, e.g. validation/accuracy; defaults to validation/<task metric>."""
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
    max_failures: Annotated[int, Field(ge=0, le=10)] = 1
    """Retries of a trial whose process died (killed, out of memory, node lost); a retry continues
    from the trial's last checkpoint. A diverged loss or a bad input is not retried."""

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

    max_steps: Annotated[int, Field(ge=1, le=100_000_000)] = 300
    """Optimizer steps per trial."""
    batch_size: Annotated[int, Field(ge=1, le=65_536)] = 32
    """Training examples per step."""
    eval_batch_size: Annotated[int, Field(ge=1, le=65_536)] = 128
    """Examples per evaluation forward pass."""
    eval_every: Annotated[int, Field(ge=1)] = 50
    """Evaluate (and report to the scheduler) every this many steps, and at the end."""
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.06
    """Share of steps with linearly rising learning rate; then linear decay to zero."""
    max_grad_norm: Annotated[float, Field(gt=0)] = 1.0
    """Gradient clipping norm."""
    max_length: Annotated[int, Field(ge=8)] = 128
    """Tokens per example after truncation."""
    seeds: Annotated[list[int], Field(min_length=1, max_length=MAX_SEEDS)] = [0]
    """Every sampled configuration runs once per seed."""
    log_every: Annotated[int, Field(ge=1)] = 10
    """Report the train loss and throughput every this many steps (between evaluations too)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Compute precision: fp32, or autocast to bf16 (GPU and CPU) or fp16 (GPU only, with loss
    scaling); weights and optimizer state stay in the dtype the model was loaded in."""
    gradient_accumulation_steps: Annotated[int, Field(ge=1, le=65_536)] = 1
    """Micro-batches per optimizer step: each `batch_size` batch is cut into this many (less
    activation memory, the same batch and data order)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of keeping them (less memory, slower)."""
    select: Literal["best", "last"] = "best"
    """Which evaluation's adapter a trial keeps, is tested and saved: best (the step with the best
    validation metric; its state is restored at the end) or last (the final step)."""
    checkpoint_every: Annotated[int, Field(ge=0, le=100_000_000)] = 1
    """Save the trial's trainable state (adapter, optimizer, schedule, random state, data position)
    every this many evaluations, 0 never: a retried or resumed trial continues from the last one."""


class ResourcesSpec(_Strict):
    """What one trial asks of the cluster."""

    cpus_per_trial: Annotated[float, Field(gt=0)] = 1
    """CPUs reserved per trial, per worker when workers_per_trial > 1 (also torch's thread count)."""
    gpus_per_trial: Annotated[float, Field(ge=0)] = 0
    """GPUs reserved per trial, per worker when workers_per_trial > 1; a fraction below 1 (0.25,
    0.5) packs several trials onto one GPU."""
    workers_per_trial: Annotated[int, Field(ge=1, le=4096)] = 1
    """Processes per trial: above 1, each trial is a Ray Train run of this many DeepSpeed workers
    (see `deepspeed`) sharing every training batch."""

    @field_validator("gpus_per_trial")
    @classmethod
    def _whole_above_one(cls, value: float) -> float:
        if value > 1 and value != int(value):
            raise ValueError(f"above 1 must be a whole number of GPUs (Ray shares only fractions of one GPU), got {value}")
        return value


class DeepSpeedSpec(_Strict):
    """DeepSpeed settings of multi-worker trials (`resources.workers_per_trial` > 1)."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    """ZeRO stage: 0 replicates everything (data parallel), 1 shards the optimizer state across
    workers, 2 also the gradients, 3 also the parameters."""
    offload_optimizer: bool = False
    """Keep the optimizer state, and run its step, in CPU memory."""
    offload_params: bool = False
    """Keep parameters in CPU memory between uses (ZeRO stage 3 only)."""

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        moved = {"gradient_accumulation_steps": "training.gradient_accumulation_steps",
                 "bf16": "training.precision: bf16"}
        if isinstance(data, dict):
            for key in data.keys() & moved.keys():
                raise ValueError(f"`deepspeed.{key}` is now `{moved[key]}`, shared by every trial")
        return data

    @field_validator("offload_params")
    @classmethod
    def _offload_needs_stage_3(cls, value: bool, info) -> bool:
        stage = info.data.get("zero_stage")
        if value and stage is not None and stage != 3:
            raise ValueError(f"needs zero_stage: 3 (parameters are only sharded there), got zero_stage: {stage}")
        return value


class QuantizationSpec(_Strict):
    """A k-bit quantized, frozen base model (QLoRA) through bitsandbytes, for LoRA-family methods."""

    bits: Literal[4, 8] = 4
    """4 (QLoRA) or 8 (LLM.int8) bits per frozen weight."""
    type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type: nf4 (normal float, QLoRA's choice) or fp4."""
    double_quant: bool = True
    """Also quantize the quantization constants (4-bit only; about 0.4 bits per weight saved)."""
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """dtype in which the dequantized weights are multiplied."""


class ExperimentSpec(_Strict):
    """A whole experiment: model, tasks, methods with their search spaces, search, training."""

    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    """Experiment name: letters, digits, '-', '_', '.'; the key in MLflow and the store."""
    description: str | None = None
    """Free text shown with the experiment."""
    model: str | None = None
    """Default model of every task: a registry alias (minilm, resnet20-cifar10, ...), a Hugging Face
    Hub id, or a local path; without it, each task type's default (minilm, resnet20-cifar10)."""
    tasks: Annotated[list[Annotated[SerializeAsAny[TaskSpec], BeforeValidator(typed_task)]],
                     Field(min_length=1, max_length=1000)]
    """Tasks to run; each gets its own search."""
    methods: Annotated[dict[str, dict[str, Any]], Field(min_length=1)]
    """Method name -> its hyperparameters: fixed values, lists (choice) or ranges."""
    model_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    """dtype of every model's weights at load; auto: the dtype the checkpoint was saved in."""
    quantization: QuantizationSpec | None = None
    """Load the frozen base model quantized (bitsandbytes; needs a CUDA GPU per trial)."""
    budget: int | str | None = None
    """Trainable parameters per method (head included): a count (50000) or a share of the task's
    model as loaded, new head included ("0.5%"). Each method's size hyperparameter is set to meet it; methods of fixed
    size run as they are and are reported with their distance from it."""
    seeds: int | list[int] | None = None
    """Re-run the best configuration per (task, method) with these seeds (a list, or N for
    0..N-1) after the search; `peftlab results` then reports mean, std and a 95% CI."""
    search: SearchSpec = SearchSpec()
    training: TrainingSpec = TrainingSpec()
    resources: ResourcesSpec = ResourcesSpec()
    deepspeed: DeepSpeedSpec = DeepSpeedSpec()

    @field_validator("budget", mode="before")
    @classmethod
    def _budget(cls, value: Any) -> Any:
        if value is not None:
            if not isinstance(value, (int, str)):
                raise ValueError("expected a parameter count or a percentage such as '0.5%'")
            parse_budget(value)
        return value

    @field_validator("seeds", mode="before")
    @classmethod
    def _seeds(cls, value: Any) -> Any:
        valid = (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_SEEDS) or (
            isinstance(value, list) and 0 < len(value) <= MAX_SEEDS and len(set(value)) == len(value)
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value))
        if value is not None and not valid:
            raise ValueError(f"give a number of seeds from 1 to {MAX_SEEDS} or a list of at most {MAX_SEEDS} "
                             "distinct integer seeds")
        return value

    @property
    def final_seeds(self) -> list[int]:
        """Seeds of the best-configuration re-runs; empty when `seeds` is not set."""
        if self.seeds is None:
            return []
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)

    def methods_for(self, task: TaskSpec) -> list[str]:
        return [m for m in self.methods if task.methods is None or m in task.methods]

    def model_for(self, task: TaskSpec) -> str:
        from peftlab.workers.tasks import task_kind

        return task.model or self.model or task_kind(task.type).default_model

    def metric_for(self, task: TaskSpec) -> str:
        return self.search.metric or f"{SEARCH_PREFIX}{task.metric}"

    def mode_for(self, task: TaskSpec) -> str:
        if self.search.mode:
            return self.search.mode
        return "min" if self.metric_for(task).removeprefix(SEARCH_PREFIX) in MINIMISED else "max"

    def spec_hash(self) -> str:
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def parse_budget(value: int | str) -> tuple[float, bool]:
    """(amount, is_percent): 50000 -> (50000, False); "0.5%" -> (0.5, True)."""
    if isinstance(value, bool):
        raise ValueError("expected a parameter count or a percentage such as '0.5%'")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"a parameter budget must be at least 1, got {value}")
        return float(value), False
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*%\s*", value)
    if match is None or not 0 < float(match[1]) <= 100:
        raise ValueError(f"expected a parameter count or a percentage in (0, 100] such as '0.5%', got {value!r}")
    return float(match[1]), True


def budget_params(budget: int | str, model_params: int) -> int:
    """The budget as a parameter count for a model with `model_params` parameters."""
    amount, percent = parse_budget(budget)
    return max(1, round(model_params * amount / 100)) if percent else int(amount)


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
    from peftlab.workers.methods import FAILED_PLUGINS, all_methods

    registry = all_methods()
    owners: dict[str, list[str]] = {}
    for method in registry.values():
        for hp in method.hparams:
            owners.setdefault(hp.name, []).append(method.name)

    methods = spec.methods if isinstance(spec, ExperimentSpec) else spec
    spaces, problems = {}, []
    for name, block in methods.items():
        where = f"methods.{name}"
        if name in FAILED_PLUGINS:
            problems.append(f"{where}: {FAILED_PLUGINS[name]}")
            continue
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
    from peftlab.workers.tasks import task_kind

    for i, task in enumerate(spec.tasks):
        metric, kind = spec.metric_for(task), task_kind(task.type)
        where = "search.metric" if spec.search.metric else f"tasks[{i}].metric"
        if metric.startswith(("eval/", "test/")):
            problems.append(f"{where}: '{metric}' cannot drive the search: searches read validation metrics "
                            f"only (use '{SEARCH_PREFIX}{metric.split('/', 1)[1]}')")
        elif metric.removeprefix(SEARCH_PREFIX) not in kind.metrics or not metric.startswith(SEARCH_PREFIX):
            allowed = ", ".join(f"{SEARCH_PREFIX}{m}" for m in kind.metrics)
            problems.append(f"{where}: '{metric}' is not reported by tasks[{i}] ({task.type}: one of {allowed})")
        else:
            problems += [f"tasks[{i}]: {p}" for p in kind.spec_problems(task, metric.removeprefix(SEARCH_PREFIX))]
        if spec.model_for(task) is None:
            problems.append(f"tasks[{i}].model: a {task.type} task needs a model (set `model` here or at the top)")
    # The store and dashboard sign scores by one direction per experiment.
    modes = {spec.mode_for(task) for task in spec.tasks}
    if len(modes) > 1:
        problems.append("tasks: their metrics are optimised in different directions (min and max); "
                        "one experiment compares in one direction: split the tasks into two specs")
    for i, task in enumerate(spec.tasks):
        unknown = [m for m in task.methods or [] if m not in spec.methods]
        if unknown:
            problems.append(f"tasks[{i}].methods: {unknown} not in the experiment's methods "
                            f"({', '.join(spec.methods)})")
    labels = [task.label for task in spec.tasks]
    for label in {lbl for lbl in labels if labels.count(lbl) > 1}:
        problems.append(f"tasks: two tasks are named '{label}'; give them distinct `name`s")
    if spec.search.algorithm == "grid":
        problems += _grid_problems(spec)
    if not problems:
        problems += _plan_size_problems(spec)
    if spec.budget is not None:
        problems += _budget_problems(spec)
    problems += _device_problems(spec)
    if spec.resources.workers_per_trial > 1:
        from peftlab.workers.distributed import multi_worker_problems

        problems += [f"tasks[{i}].bias_eval: runs in one-process trials; use workers_per_trial: 1"
                     for i, task in enumerate(spec.tasks) if task.bias_eval]

        problems += multi_worker_problems(list(spec.methods), spec.training, spec.resources,
                                          quantized=spec.quantization is not None,
                                          zero_stage=spec.deepspeed.zero_stage)
    else:
        from peftlab.workers.train import batch_problems

        problems += batch_problems(spec.training.batch_size, spec.training.gradient_accumulation_steps)
    return problems


def _device_problems(spec: ExperimentSpec) -> list[str]:
    """Precision and quantization against the trial's devices and methods."""
    from peftlab.workers.methods import all_methods

    problems, on_gpu = [], spec.resources.gpus_per_trial > 0
    if spec.training.precision == "fp16" and not on_gpu:
        problems.append("training.precision: fp16 needs a GPU (resources.gpus_per_trial is 0); "
                        "on CPU use bf16 or fp32")
    if spec.quantization is not None:
        if not on_gpu:
            problems.append("quantization: bitsandbytes quantization needs a CUDA GPU per trial "
                            "(resources.gpus_per_trial is 0)")
        registry = all_methods()
        refused = [m for m in spec.methods if m in registry and not registry[m].quantizable]
        if refused:
            allowed = ", ".join(sorted(n for n, m in registry.items() if m.quantizable))
            problems.append(f"quantization: trains LoRA-family methods only ({allowed}) on the frozen "
                            f"quantized base, not {', '.join(refused)}")
    return problems


def _budget_problems(spec: ExperimentSpec) -> list[str]:
    from peftlab.workers.methods import get_method

    spaces, _ = method_spaces(spec)
    problems = []
    for space in spaces.values():
        size = next((h.name for h in get_method(space.method).hparams if h.size), None)
        if size in space.leaves:
            problems.append(f"methods.{space.method}.{size}: set by `budget`; remove it or remove the budget")
    return problems


def _plan_size_problems(spec: ExperimentSpec) -> list[str]:
    """Count each task's trials without building them; refuse a plan beyond MAX_TRIALS."""
    import math

    spaces, _ = method_spaces(spec)
    problems = []
    for i, task in enumerate(spec.tasks):
        seeds = len(spec.training.seeds)
        if spec.search.algorithm == "grid":
            grid = sum(math.prod(len(leaf.grid_values()) for leaf in spaces[m].leaves.values())
                       for m in spec.methods_for(task) if m in spaces)
            what, trials = f"a grid of {grid:,} configurations x {spec.search.samples} repeats", grid * spec.search.samples * seeds
        else:
            configs = spec.search.samples * (len(spec.methods_for(task)) if spec.search.per_method else 1)
            what, trials = f"{configs:,} configurations", configs * seeds
        if trials > MAX_TRIALS:
            problems.append(f"tasks[{i}]: {what} x {seeds} seeds is {trials:,} trials, more than "
                            f"the {MAX_TRIALS:,} one task may plan; narrow the search")
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


def parse_stored_spec(data: dict) -> ExperimentSpec:
    """A spec as a results store recorded it; a store from before test splits held `eval_fraction`
    and `eval/` metrics, which mean what `validation_fraction` and `validation/` mean now."""
    data = json.loads(json.dumps(data))
    for task in data.get("tasks") or []:
        if isinstance(task, dict) and "eval_fraction" in task:
            task["validation_fraction"] = task.pop("eval_fraction")
    search = data.get("search")
    if isinstance(search, dict) and str(search.get("metric") or "").startswith("eval/"):
        search["metric"] = SEARCH_PREFIX + search["metric"].removeprefix("eval/")
    return parse_spec(data)


def _with_registry_defaults(task: TaskSpec) -> TaskSpec:
    """Registry datasets bring their domain and metric; otherwise the task type's default metric."""
    from peftlab.workers.tasks import task_kind

    kind = task_kind(task.type)
    info = kind.registry_dataset(task.dataset)
    return task.model_copy(update={
        "domain": task.domain or (info.domain if info else None),
        "metric": task.metric or (info.metric if info else kind.default_metric(task)),
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
