"""Multiple choice: a context and a question scored against each candidate answer (one sequence per
choice, one logit each); loss and accuracy out, accuracy per context condition (BBQ's ambiguous and
disambiguated contexts) beside them, and the drift of the pooled representation as retention."""
from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field
from torch import nn

from peftlab import settings
from peftlab.errors import UserError
from peftlab.spec import TaskSpec, TrainingSpec
from peftlab.workers.data import FILE_SUFFIXES, SplitOptions, _missing_column, _read_file, _texts, split_options
from peftlab.workers.models import LoadOptions
from peftlab.workers.splits import SPLITS, three_way
from peftlab.workers.tasks.base import DriftTask, TaskKind, loss_and_predictions

MAX_CHOICES = 16


@dataclass(frozen=True)
class ChoiceDatasetInfo:
    """A registry multiple-choice data set: what it is, how it is scored, where its files live."""

    name: str
    domain: str
    metric: str
    license: str
    origin: str
    folder: str
    """Under the data root (PEFTLAB_DATA_DIR)."""
    description: str


BBQ = ChoiceDatasetInfo(
    name="bbq", domain="bias/question-answering", metric="accuracy", license="CC BY 4.0",
    origin="https://github.com/nyu-mll/BBQ", folder="bias/bbq",
    description="BBQ (Parrish et al. 2022), the categories present locally (Age, Disability_status, Nationality, "
    "Physical_appearance, Religion, Sexual_orientation: 11,956 questions); three answers, one of them 'unknown'; "
    "validation and test carved by question template.",
)
CHOICE_DATASETS = {BBQ.name: BBQ}
BBQ_CONDITIONS = {"ambig": "ambiguous", "disambig": "disambiguated"}


class MultipleChoiceSpec(TaskSpec):
    """A multiple-choice task: a context, a question and candidate answers, the label the right one's position."""

    type: Literal["multiple-choice"] = "multiple-choice"
    context_column: str = "context"
    """Column holding the passage the question is about (files)."""
    question_column: str = "question"
    """Column holding the question (files)."""
    choice_columns: Annotated[list[str], Field(min_length=2, max_length=MAX_CHOICES)] = ["ans0", "ans1", "ans2"]
    """Columns holding the candidate answers, in order (files)."""
    label_column: str = "label"
    """Column holding the position (from 0) of the right answer among `choice_columns` (files)."""
    condition_column: str | None = None
    """Column whose values split the evaluation: accuracy_<value> is reported for each (files;
    bbq: its context condition, ambiguous or disambiguated)."""
    group_column: str | None = None
    """Column whose rows stay together in one split when validation and test are carved, e.g. a
    question template's id (files; bbq: its category and question template)."""
    categories: Annotated[list[str], Field(min_length=1)] | None = None
    """bbq: the categories to use (default: every one present under the data root)."""


@dataclass
class Questions:
    contexts: list[str]
    questions: list[str]
    choices: list[list[str]]
    labels: list[int]
    conditions: list[str] | None = None

    def take(self, rows: np.ndarray) -> Questions:
        pick = lambda values: None if values is None else [values[i] for i in rows]  # noqa: E731
        return Questions(pick(self.contexts), pick(self.questions), pick(self.choices), pick(self.labels),
                         pick(self.conditions))


@dataclass
class MultipleChoiceData:
    train: Questions
    validation: Questions
    test: Questions
    num_choices: int
    sizes: dict[str, int]

    @property
    def num_labels(self) -> int:
        return self.num_choices

    @property
    def label_names(self) -> list[str]:
        return [f"choice {i}" for i in range(self.num_choices)]

    def __getattr__(self, name: str):
        # `<split>_labels`, as validation's data summary reads classifiers' data.
        split = name.removesuffix("_labels")
        if name.endswith("_labels") and split in SPLITS:
            return getattr(self, split).labels
        raise AttributeError(name)


def bbq_frames(spec: MultipleChoiceSpec, data_dir: Path | None) -> pd.DataFrame:
    root = data_dir or settings.data_dir()
    if root is None:
        raise UserError(f"dataset 'bbq' needs its files: set PEFTLAB_DATA_DIR to a folder holding {BBQ.folder}/ "
                        f"(origin: {BBQ.origin})")
    folder = Path(root) / BBQ.folder
    present = sorted(p.stem for p in folder.glob("*.jsonl"))
    wanted = spec.categories or present
    unknown = [c for c in wanted if c not in present]
    if unknown or not wanted:
        raise UserError(f"bbq: categories {unknown or '(none)'} not under {folder} (present: {', '.join(present) or 'none'})")
    frame = pd.concat([_read_file(folder / f"{c}.jsonl") for c in wanted], ignore_index=True)
    frame["context_condition"] = frame["context_condition"].map(BBQ_CONDITIONS)
    frame["template"] = frame["category"] + ":" + frame["question_index"].astype(str)
    return frame


def question_columns(spec: MultipleChoiceSpec, registry: bool) -> dict[str, str | None]:
    if registry:
        return {"context": "context", "question": "question", "label": "label",
                "condition": "context_condition", "group": "template"}
    return {"context": spec.context_column, "question": spec.question_column, "label": spec.label_column,
            "condition": spec.condition_column, "group": spec.group_column}


def read_questions(frame: pd.DataFrame, columns: dict[str, str | None], choices: list[str], where: str) -> Questions:
    for kind, column in [*((k, v) for k, v in columns.items() if v), *(("choice", c) for c in choices)]:
        if column not in frame.columns:
            raise UserError(_missing_column(kind, column, list(frame.columns)), where=where)
    labels = pd.to_numeric(frame[columns["label"]], errors="coerce")
    bad = labels.isna() | (labels % 1 != 0) | (labels < 0) | (labels >= len(choices))
    if bad.any():
        rows = ", ".join(str(int(i) + 1) for i in frame.index[bad][:5])
        raise UserError(f"label column '{columns['label']}' must hold the right answer's position, 0 to "
                        f"{len(choices) - 1}; data rows {rows} (counted from 1) do not", where=where)
    answers = [_texts(frame[c], c, where) for c in choices]
    condition = columns["condition"]
    return Questions(
        contexts=_texts(frame[columns["context"]], columns["context"], where),
        questions=_texts(frame[columns["question"]], columns["question"], where),
        choices=[list(row) for row in zip(*answers, strict=True)],
        labels=labels.astype(int).tolist(),
        conditions=None if condition is None else frame[condition].astype(str).tolist(),
    )


def load_multiple_choice(spec: MultipleChoiceSpec, data_dir: Path | None,
                         options: SplitOptions | None = None) -> MultipleChoiceData:
    """bbq (registry) or a .csv/.tsv/.jsonl/.json file as train, validation and test (carved by
    `group_column` where set, else stratified by the right answer's position)."""
    options = options or split_options(spec)
    options.check()
    registry = spec.dataset in CHOICE_DATASETS
    columns = question_columns(spec, registry)
    choices = ["ans0", "ans1", "ans2"] if registry else list(spec.choice_columns)
    if registry:
        frames = [bbq_frames(spec, data_dir), None, None]
    elif spec.dataset.lower().endswith(FILE_SUFFIXES):
        frames = [_read_file(Path(spec.dataset).expanduser()), None, None]
    else:
        raise UserError(f"unknown multiple-choice dataset '{spec.dataset}': not a registered name "
                        f"({', '.join(CHOICE_DATASETS)}) or a {'/'.join(FILE_SUFFIXES)} file")
    for position, path in ((1, options.validation_file), (2, options.test_file)):
        if path is not None:
            frames[position] = _read_file(Path(path).expanduser())
    parts = [None if f is None else read_questions(f, columns, choices, f"{spec.dataset} ({split})")
             for f, split in zip(frames, SPLITS)]
    whole = pd.concat([f for f in frames if f is not None], ignore_index=True)
    labels = np.asarray(sum((p.labels for p in parts if p is not None), []))
    groups = None if columns["group"] is None else whole[columns["group"]].astype(str).to_numpy()
    split = three_way(len(frames[0]), *(None if f is None else len(f) for f in frames[1:]), where=spec.dataset,
                      labels=labels, groups=groups, validation_fraction=options.validation_fraction,
                      test_fraction=options.test_fraction, max_train=options.max_train_samples,
                      max_eval=options.max_eval_samples)
    merged = Questions(*(sum((getattr(p, field) for p in parts if p is not None), [])
                         for field in ("contexts", "questions", "choices", "labels")),
                       conditions=None if parts[0].conditions is None
                       else sum((p.conditions for p in parts if p is not None), []))
    return MultipleChoiceData(merged.take(split.train), merged.take(split.validation), merged.take(split.test),
                              num_choices=len(choices), sizes=split.sizes())


def encode_questions(tokenizer, questions: Questions, max_length: int) -> dict[str, torch.Tensor]:
    """examples x choices x tokens inputs: the context as the first segment, question and answer as
    the second (the longer segment is cut first); `labels` are the right answers' positions."""
    count = len(questions.choices[0])
    first = [context for context in questions.contexts for _ in range(count)]
    second = [f"{q} {a}" for q, answers in zip(questions.questions, questions.choices, strict=True) for a in answers]
    encoded = tokenizer(first, second, padding="longest", truncation="longest_first", max_length=max_length,
                        return_tensors="pt")
    out = {k: v.view(len(questions.labels), count, -1) for k, v in encoded.items()
           if k in ("input_ids", "attention_mask", "token_type_ids")}
    out["labels"] = torch.tensor(questions.labels, dtype=torch.long)
    return out


def trim_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Padding is to the longest sequence of the split; cut to the batch's longest.
    length = int(batch["attention_mask"].sum(-1).max())
    return {k: (v[..., :length] if v.dim() == 3 else v) for k, v in batch.items()}


def metric_name(condition: str) -> str:
    return "accuracy_" + re.sub(r"[^A-Za-z0-9_]+", "_", condition).strip("_").lower()


class MultipleChoiceTask(DriftTask):
    """Batches of questions with all their answers; accuracy overall and per context condition."""

    def __init__(self, data: MultipleChoiceData, tokenizer, max_length: int, *, head: tuple[str, ...],
                 retention_samples: int = 0) -> None:
        self.head = head[0] if head else None
        self.retention_samples = retention_samples
        self.train = encode_questions(tokenizer, data.train, max_length)
        self.splits = {split: encode_questions(tokenizer, getattr(data, split), max_length)
                       for split in ("validation", "test")}
        self.conditions = {split: getattr(data, split).conditions for split in ("validation", "test")}

    def train_batches(self, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        generator = torch.Generator().manual_seed(seed)
        n = len(self.train["labels"])
        size = min(batch_size, n)
        while True:
            order = torch.randperm(n, generator=generator)
            for start in range(0, n - size + 1, size):  # a last partial batch is dropped
                yield trim_batch({k: v[order[start:start + size]] for k, v in self.train.items()})

    def evaluate(self, model: nn.Module, batch_size: int, device: torch.device,
                 split: str = "validation") -> dict[str, float]:
        encoded = self.splits[split]
        loss, pred = loss_and_predictions(model, (
            trim_batch({k: v[start:start + batch_size].to(device) for k, v in encoded.items()})
            for start in range(0, len(encoded["labels"]), batch_size)))
        right = (pred == encoded["labels"]).float()
        metrics = {"loss": loss, "accuracy": right.mean().item()}
        if (conditions := self.conditions[split]) is not None:
            values = np.asarray(conditions)
            for condition in sorted(set(conditions)):
                metrics[metric_name(condition)] = right[torch.from_numpy(values == condition)].mean().item()
        return metrics

    def reference_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        reference = self.splits["validation"]
        n = min(self.retention_samples, len(reference["labels"]))
        for start in range(0, n, 32):
            yield trim_batch({k: v[start:min(start + 32, n)] for k, v in reference.items()})


class MultipleChoiceKind(TaskKind):
    name = "multiple-choice"
    summary = "the right answer among a question's candidates (BBQ); one score per answer from a new head"
    spec_model = MultipleChoiceSpec
    metrics = ("accuracy", "loss")
    offers = frozenset({"linear_layers", "blocks", "new_head"})
    default_model = "minilm"
    scores_answers = True

    def registry_dataset(self, name: str) -> ChoiceDatasetInfo | None:
        return CHOICE_DATASETS.get(name)

    def spec_problems(self, spec: MultipleChoiceSpec, metric: str) -> list[str]:
        if spec.categories is not None and spec.dataset not in CHOICE_DATASETS:
            return ["categories: only for the bbq registry data set"]
        return []

    def load_data(self, spec: MultipleChoiceSpec, data_dir: Path | None) -> MultipleChoiceData:
        return load_multiple_choice(spec, data_dir)

    def _auto(self, name: str, *, meta: bool, options: LoadOptions = LoadOptions()):
        from transformers import AutoModelForMultipleChoice

        from peftlab.workers.models import load_config, resolve_model

        config = load_config(name, None)
        try:
            if meta:
                with torch.device("meta"):
                    return AutoModelForMultipleChoice.from_config(config)
            return AutoModelForMultipleChoice.from_pretrained(resolve_model(name), config=config,
                                                              **options.pretrained_kwargs())
        except ValueError as exc:
            if "Unrecognized configuration class" not in str(exc):
                raise
            raise UserError(f"model '{name}' ({config.model_type}) has no multiple-choice head in transformers; "
                            "use an encoder such as BERT, RoBERTa or DistilBERT") from None

    def load_model(self, model: str, data: MultipleChoiceData, data_dir: Path | None,
                   options: LoadOptions = LoadOptions()):
        from transformers import AutoTokenizer

        from peftlab.workers.models import resolve_model

        return self._auto(model, meta=False, options=options), AutoTokenizer.from_pretrained(resolve_model(model))

    def meta_model(self, model: str, data: MultipleChoiceData, data_dir: Path | None) -> nn.Module:
        return self._auto(model, meta=True)

    def head_modules(self, model: nn.Module) -> tuple[str, ...]:
        from peftlab.workers.models import head_modules

        return head_modules(model)

    def prediction_inputs(self, spec: MultipleChoiceSpec, path: Path) -> Questions:
        """The questions of a local file: context, question and choice columns (no label needed)."""
        frame = _read_file(path)
        frame[spec.label_column] = 0  # unknown: predictions only
        columns = {**question_columns(spec, False), "condition": None, "group": None}
        return read_questions(frame, columns, list(spec.choice_columns), str(path))

    @torch.no_grad()
    def predict(self, model: nn.Module, processor, data: MultipleChoiceData, spec: MultipleChoiceSpec,
                training: TrainingSpec, inputs: Questions) -> list[dict]:
        """The chosen answer, its position and probability for each question, in order."""
        model.eval()
        device = next(model.parameters()).device
        encoded = encode_questions(processor, inputs, training.max_length)
        encoded.pop("labels")
        rows = []
        for start in range(0, len(inputs.labels), training.eval_batch_size):
            batch = trim_batch({k: v[start:start + training.eval_batch_size].to(device) for k, v in encoded.items()})
            probabilities = model(**batch).logits.float().softmax(-1).cpu()
            best, index = probabilities.max(-1)
            for i, (k, p) in enumerate(zip(index.tolist(), best.tolist(), strict=True)):
                row = start + i
                rows.append({"row": row + 1, spec.question_column: inputs.questions[row], "prediction": k,
                             "answer": inputs.choices[row][k], "probability": round(float(p), 6)})
        return rows

    def corpus(self, data: MultipleChoiceData) -> list[str]:
        return list(data.train.contexts)

    def build_task(self, data: MultipleChoiceData, processor, head: tuple[str, ...], spec: MultipleChoiceSpec,
                   training: TrainingSpec, data_dir: Path | None) -> MultipleChoiceTask:
        return MultipleChoiceTask(data, processor, training.max_length, head=head,
                                  retention_samples=spec.retention_samples if spec.retention else 0)
