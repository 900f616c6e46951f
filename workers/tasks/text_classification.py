"""Text classification: tokenized batches in, loss and accuracy / macro-F1 out, and the drift
of the sentence representation. The data set is tokenized once up front (these sets are small);
batches are index slices of padded tensors, drawn from a seeded generator."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from peftlab.spec import TaskSpec, TrainingSpec
from peftlab.workers.models import LoadOptions
from peftlab.workers.data import DATASETS, TextClassificationData, load_text_classification, split_options
from peftlab.workers.tasks.base import DriftTask, TaskKind, loss_and_predictions


class TextClassificationSpec(TaskSpec):
    """A text classification task: one text column, one label column."""

    type: Literal["text-classification"] = "text-classification"
    text_column: str = "text"
    """Column holding the input text (files and Hub datasets)."""
    label_column: str = "label"
    """Column holding the label: integers or strings."""

GROUP_WINDOW = 50
"""Batches per window within which examples are grouped by length (see `train_batches`)."""


def _encode(tokenizer, texts: list[str], labels: list[int] | None, max_length: int) -> dict[str, torch.Tensor]:
    """Model inputs for the texts, with `labels` unless there are none (prediction)."""
    encoded = tokenizer(texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    encoded = {k: v for k, v in encoded.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    if labels is not None:
        encoded["labels"] = torch.tensor(labels, dtype=torch.long)
    return encoded


def macro_f1(pred: torch.Tensor, gold: torch.Tensor, num_labels: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in gold or predictions."""
    scores = []
    for c in range(num_labels):
        tp = ((pred == c) & (gold == c)).sum().item()
        fp = ((pred == c) & (gold != c)).sum().item()
        fn = ((pred != c) & (gold == c)).sum().item()
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


class TextClassificationTask(DriftTask):
    """Batches for training, evaluation with loss, accuracy and macro-F1, representation drift.

    Drift is measured on the first `retention_samples` validation sentences: the input of the first
    head module (the sentence representation the head classifies) before and after tuning.
    """

    def __init__(self, data: TextClassificationData, tokenizer, max_length: int, *,
                 head: tuple[str, ...] = ("classifier",), retention_samples: int = 0) -> None:
        self.num_labels = data.num_labels
        self.head = head[0] if head else None
        self.retention_samples = retention_samples
        self.train = _encode(tokenizer, data.train_texts, data.train_labels, max_length)
        self.num_train = len(data.train_labels)
        self.train_lengths = self.train["attention_mask"].sum(-1)
        self.splits = {split: _by_length(_encode(tokenizer, getattr(data, f"{split}_texts"),
                                                 getattr(data, f"{split}_labels"), max_length))
                       for split in ("validation", "test")}

    def train_batches(self, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        """An endless stream of shuffled training batches (reshuffled each epoch).

        Within windows of GROUP_WINDOW batches, examples are sorted by length before being cut
        into batches, and the batches are then shuffled (like transformers' group_by_length):
        batches pad only to their own longest example, so short sentences stop paying for
        long ones, while the order of batches stays random.
        """
        generator = torch.Generator().manual_seed(seed)
        size = min(batch_size, self.num_train)
        window = size * GROUP_WINDOW
        while True:
            order = torch.randperm(self.num_train, generator=generator)
            batches = []
            for start in range(0, self.num_train, window):
                chunk = order[start:start + window]
                chunk = chunk[self.train_lengths[chunk].argsort(descending=True, stable=True)]
                # A last partial batch is dropped: every step sees `size` examples.
                batches += [chunk[i:i + size] for i in range(0, len(chunk) - size + 1, size)]
            for b in torch.randperm(len(batches), generator=generator).tolist():
                yield _trim({k: v[batches[b]] for k, v in self.train.items()})

    def evaluate(self, model: nn.Module, batch_size: int, device: torch.device,
                 split: str = "validation") -> dict[str, float]:
        encoded = self.splits[split]
        n = len(encoded["labels"])
        loss, pred = loss_and_predictions(model, (
            _trim({k: v[start:start + batch_size].to(device) for k, v in encoded.items()})
            for start in range(0, n, batch_size)))
        gold = encoded["labels"]
        return {
            "loss": loss,
            "accuracy": (pred == gold).float().mean().item(),
            "macro_f1": macro_f1(pred, gold, self.num_labels),
        }

    def reference_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        reference = self.splits["validation"]
        n = min(self.retention_samples, len(reference["labels"]))
        for start in range(0, n, 64):
            yield _trim({k: v[start:min(start + 64, n)] for k, v in reference.items()})


class TextClassificationKind(TaskKind):
    name = "text-classification"
    summary = "a label per text (sentiment, intent, stance); a new classification head"
    spec_model = TextClassificationSpec
    metrics = ("accuracy", "macro_f1", "loss")
    offers = frozenset({"linear_layers", "blocks", "new_head", "token_prompt", "example_representation"})
    peft_task_type = "SEQ_CLS"
    default_model = "minilm"

    def registry_dataset(self, name: str):
        return DATASETS.get(name)

    def default_metric(self, spec: TextClassificationSpec) -> str:
        return "accuracy"

    def load_data(self, spec: TextClassificationSpec, data_dir: Path | None) -> TextClassificationData:
        return load_text_classification(
            spec.dataset, text_column=spec.text_column, label_column=spec.label_column,
            options=split_options(spec), data_dir=data_dir,
        )

    def load_model(self, model: str, data: TextClassificationData, data_dir: Path | None,
                   options: LoadOptions = LoadOptions()):
        from peftlab.workers.models import load_classifier

        return load_classifier(model, data.num_labels, options)

    def meta_model(self, model: str, data: TextClassificationData, data_dir: Path | None) -> nn.Module:
        from peftlab.workers.models import meta_classifier

        return meta_classifier(model, data.num_labels)

    def head_modules(self, model: nn.Module) -> tuple[str, ...]:
        from peftlab.workers.models import head_modules

        return head_modules(model)

    def prediction_inputs(self, spec: TextClassificationSpec, path: Path) -> list[str]:
        from peftlab.workers.data import read_file_texts

        return read_file_texts(path, spec.text_column)

    @torch.no_grad()
    def predict(self, model: nn.Module, processor, data: TextClassificationData, spec: TextClassificationSpec,
                training: TrainingSpec, inputs: list[str]) -> list[dict]:
        """The label and its probability for each text, in order."""
        model.eval()
        device = next(model.parameters()).device
        rows = []
        for start in range(0, len(inputs), training.eval_batch_size):
            chunk = inputs[start:start + training.eval_batch_size]
            batch = _encode(processor, chunk, None, training.max_length)
            probabilities = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().softmax(-1).cpu()
            best, index = probabilities.max(-1)
            rows += [{"row": start + i + 1, spec.text_column: text, "prediction": data.label_names[k],
                      "probability": round(float(p), 6)}
                     for i, (text, k, p) in enumerate(zip(chunk, index.tolist(), best.tolist(), strict=True))]
        return rows

    def corpus(self, data: TextClassificationData) -> list[str]:
        return list(data.train_texts)

    def build_task(self, data: TextClassificationData, processor, head: tuple[str, ...], spec: TextClassificationSpec,
                   training: TrainingSpec, data_dir: Path | None) -> TextClassificationTask:
        return TextClassificationTask(data, processor, training.max_length, head=head,
                                      retention_samples=spec.retention_samples if spec.retention else 0)


def _by_length(encoded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Evaluation order does not change the metrics; sorted by length, batches pad less.
    order = encoded["attention_mask"].sum(-1).argsort(descending=True, stable=True)
    return {k: v[order] for k, v in encoded.items()}


def _trim(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Padding is to the longest text in the whole set; cutting to the batch's longest
    # saves most of the attention cost on short sentences.
    length = int(batch["attention_mask"].sum(-1).max())
    return {k: (v[:, :length] if v.dim() == 2 else v) for k, v in batch.items()}
