"""Image classification: uint8 images resized and normalised per batch for the backbone, loss,
accuracy, macro-F1 and (two classes) AUROC out, and the drift of the pooled representation."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.errors import UserError
from peftlab.spec import TaskSpec, TrainingSpec
from peftlab.workers.models import LoadOptions
from peftlab.workers.data import split_options
from peftlab.workers.image_data import IMAGE_DATASETS, ImageClassificationData, load_image_classification
from peftlab.workers.tasks.base import DriftTask, TaskKind
from peftlab.workers.tasks.text_classification import macro_f1


class ImageClassificationSpec(TaskSpec):
    """An image classification task on a registry image data set."""

    type: Literal["image-classification"] = "image-classification"


@dataclass(frozen=True)
class InputFormat:
    """What a backbone takes: square images of `size`, `channels` channels, normalised by mean/std."""

    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def to_model_input(images: torch.Tensor, fmt: InputFormat) -> torch.Tensor:
    """uint8 N x C x H x W -> float N x channels x size x size: grey repeated, resized, normalised."""
    x = images.float() / 255.0
    if x.shape[1] != fmt.channels:
        if x.shape[1] != 1:
            raise UserError(f"images have {x.shape[1]} channels; the model takes {fmt.channels} "
                            "(only 1-channel images are repeated to fit)")
        x = x.expand(-1, fmt.channels, -1, -1)
    if x.shape[-2:] != (fmt.size, fmt.size):
        x = F.interpolate(x, size=(fmt.size, fmt.size), mode="bilinear", align_corners=False)
    mean = torch.tensor(fmt.mean).view(1, -1, 1, 1)
    std = torch.tensor(fmt.std).view(1, -1, 1, 1)
    return (x - mean) / std


def auroc(scores: torch.Tensor, gold: torch.Tensor) -> float:
    """Area under the ROC curve of `scores` for the positive class 1 (Mann-Whitney, ties count half)."""
    positive, negative = scores[gold == 1], scores[gold == 0]
    if len(positive) == 0 or len(negative) == 0:
        return float("nan")
    greater = (positive[:, None] > negative[None, :]).float().sum()
    ties = (positive[:, None] == negative[None, :]).float().sum()
    return float((greater + 0.5 * ties) / (len(positive) * len(negative)))


class ImageClassificationTask(DriftTask):
    """Seeded shuffled batches of `pixel_values` and `labels`; images stay uint8 until a batch is cut."""

    def __init__(self, data: ImageClassificationData, fmt: InputFormat, *, head: tuple[str, ...],
                 retention_samples: int = 0) -> None:
        # Fail at build time, not at the first batch, on images the backbone cannot take.
        to_model_input(data.train_images[:1], fmt)
        self.data, self.fmt = data, fmt
        self.num_labels = data.num_labels
        self.head = head[0] if head else None
        self.retention_samples = retention_samples

    def _batch(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pixel_values": to_model_input(images, self.fmt), "labels": labels}

    def train_batches(self, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        generator = torch.Generator().manual_seed(seed)
        n = len(self.data.train_labels)
        size = min(batch_size, n)
        while True:
            order = torch.randperm(n, generator=generator)
            for start in range(0, n - size + 1, size):  # a last partial batch is dropped
                index = order[start:start + size]
                yield self._batch(self.data.train_images[index], self.data.train_labels[index])

    def _eval_batches(self, split: str, batch_size: int, limit: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        images, labels = self.data.split(split)
        n = len(labels) if limit is None else min(limit, len(labels))
        for start in range(0, n, batch_size):
            end = min(start + batch_size, n)
            yield self._batch(images[start:end], labels[start:end])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch_size: int, device: torch.device,
                 split: str = "validation") -> dict[str, float]:
        model.eval()
        total_loss, logits = 0.0, []
        for batch in self._eval_batches(split, batch_size):
            out = model(**{k: v.to(device) for k, v in batch.items()})
            total_loss += out.loss.item() * len(batch["labels"])
            logits.append(out.logits.float().cpu())
        model.train()
        scores, gold = torch.cat(logits), self.data.split(split)[1]
        pred = scores.argmax(-1)
        metrics = {
            "loss": total_loss / len(gold),
            "accuracy": (pred == gold).float().mean().item(),
            "macro_f1": macro_f1(pred, gold, self.num_labels),
        }
        if self.num_labels == 2:
            metrics["auroc"] = auroc(scores.softmax(-1)[:, 1], gold)
        return metrics

    def reference_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        return self._eval_batches("validation", 64, self.retention_samples)


class ImageClassificationKind(TaskKind):
    name = "image-classification"
    summary = "a label per image (medical, digits, remote sensing); a new classification head"
    spec_model = ImageClassificationSpec
    metrics = ("accuracy", "macro_f1", "auroc", "loss")
    offers = frozenset({"linear_layers", "blocks", "new_head", "patch_tokens", "example_representation"})
    default_model = "resnet20-cifar10"

    def registry_dataset(self, name: str):
        return IMAGE_DATASETS.get(name)

    def default_metric(self, spec: ImageClassificationSpec) -> str:
        return "accuracy"

    def load_data(self, spec: ImageClassificationSpec, data_dir: Path | None) -> ImageClassificationData:
        return load_image_classification(spec.dataset, data_dir=data_dir, options=split_options(spec))

    def load_model(self, model: str, data: ImageClassificationData, data_dir: Path | None,
                   options: LoadOptions = LoadOptions()):
        from peftlab.workers.models import load_image_classifier

        return load_image_classifier(model, data.num_labels, data_dir, options=options)

    def meta_model(self, model: str, data: ImageClassificationData, data_dir: Path | None) -> nn.Module:
        from peftlab.workers.models import load_image_classifier

        net, fmt = load_image_classifier(model, data.num_labels, data_dir, meta=True)
        to_model_input(data.train_images[:1], fmt)  # a channel mismatch is a validation problem
        return net

    def head_modules(self, model: nn.Module) -> tuple[str, ...]:
        from peftlab.workers.models import image_head_modules

        return image_head_modules(model)

    def prediction_inputs(self, spec: ImageClassificationSpec, path: Path) -> torch.Tensor:
        """The images of a local .npz file: its `images` array, uint8, N x H x W (grey) or N x C x H x W."""
        import numpy as np

        if path.suffix.lower() != ".npz" or not path.is_file():
            raise UserError(f"{path}: image prediction reads a .npz file with an `images` array")
        try:
            with np.load(path) as npz:
                images = npz["images"] if "images" in npz.files else None
                found = ", ".join(npz.files)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None
        if images is None:
            raise UserError(f"{path} has no `images` array (has: {found or 'nothing'})")
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) == 0:
            raise UserError(f"{path}: `images` is {images.dtype} {images.shape}; expected uint8 N x H x W or N x C x H x W")
        return torch.from_numpy(images[:, None] if images.ndim == 3 else images)

    @torch.no_grad()
    def predict(self, model: nn.Module, processor: InputFormat, data: ImageClassificationData, spec: ImageClassificationSpec,
                training: TrainingSpec, inputs: torch.Tensor) -> list[dict]:
        """The label and its probability for each image, in order."""
        model.eval()
        device = next(model.parameters()).device
        rows = []
        for start in range(0, len(inputs), training.eval_batch_size):
            chunk = to_model_input(inputs[start:start + training.eval_batch_size], processor)
            probabilities = model(pixel_values=chunk.to(device)).logits.float().softmax(-1).cpu()
            best, index = probabilities.max(-1)
            rows += [{"row": start + i + 1, "prediction": data.label_names[k], "probability": round(float(p), 6)}
                     for i, (k, p) in enumerate(zip(index.tolist(), best.tolist(), strict=True))]
        return rows

    def build_task(self, data: ImageClassificationData, processor: InputFormat, head: tuple[str, ...],
                   spec: ImageClassificationSpec, training: TrainingSpec, data_dir: Path | None) -> ImageClassificationTask:
        return ImageClassificationTask(data, processor, head=head,
                                       retention_samples=spec.retention_samples if spec.retention else 0)
