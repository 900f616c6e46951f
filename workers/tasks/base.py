"""What every task type provides: a `TaskKind` (its spec keys, data, model, head, metrics, what it
offers methods) and the `Task` it builds (training batches, evaluation, retention)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from peftlab.errors import UserError
from peftlab.spec import TaskSpec, TrainingSpec
from peftlab.workers.models import LoadOptions


class Task(ABC):
    """Batches for training and evaluation for one task; a batch is the model's keyword arguments."""

    @abstractmethod
    def train_batches(self, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        """An endless, seeded stream of training batches (each with `labels`)."""

    @abstractmethod
    def evaluate(self, model: nn.Module, batch_size: int, device: torch.device) -> dict[str, float]:
        """Metrics on the eval split (names without the eval/ prefix)."""

    def remember(self, model: nn.Module, device: torch.device) -> None:
        """Called on the untouched model, before the method is applied: keep what retention needs."""

    def retention(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """How far the tuned model moved from the untouched one (0 when it did not)."""
        return {}


OFFERS = {
    "linear_layers": "linear layers to adapt",
    "blocks": "transformer blocks to hang adapters on",
    "new_head": "a new task head",
    "token_prompt": "token inputs to prepend soft prompts to (one sequence per example)",
    "patch_tokens": "a sequence of image patch tokens",
    "example_representation": "one representation per example at the head's input (classification)",
}
"""What a task type can offer a method; a method names what it needs (`Method.needs`)."""


class TaskKind(ABC):
    """One task type: its spec model and metrics, loads its data and model and builds its `Task`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    """One line: what the task learns and from what."""
    spec_model: ClassVar[type[TaskSpec]]
    """The pydantic model of this type's task entries (TaskSpec plus the type's own keys)."""
    metrics: ClassVar[tuple[str, ...]]
    """Metrics reported under validation/ and test/ that a search may optimise."""
    offers: ClassVar[frozenset[str]]
    """Keys of OFFERS this task type provides to methods."""
    peft_task_type: ClassVar[str | None] = None
    """peft's TaskType name for its task-specific wrapper; None: a plain PeftModel, which passes every
    keyword through (peft's wrappers handle token inputs only)."""
    default_model: ClassVar[str | None]
    """Used when neither the task nor the experiment names a model."""
    scores_answers: ClassVar[bool] = False
    """Its model scores each candidate answer of a question (what BBQ's bias score reads)."""
    language_model: ClassVar[bool] = False
    """Its model is a language model with its pretrained head (what CrowS-Pairs and WinoBias read)."""

    def corpus(self, data: Any) -> list[str]:
        """The training split's texts, for a method that trains a first stage on text; empty for
        task types without text."""
        return []

    def registry_dataset(self, name: str) -> Any:
        """The registry data set of this type called `name` (with its `domain` and `metric`), or None."""
        return None

    def default_metric(self, spec: TaskSpec) -> str:
        """The metric of a task whose data set is not in the registry and that names none."""
        return self.metrics[0]

    def spec_problems(self, spec: TaskSpec, metric: str) -> list[str]:
        """One line per problem with a task entry that its model alone cannot see (`metric`: the
        validation metric the search optimises, without its prefix)."""
        return []

    @abstractmethod
    def load_data(self, spec: TaskSpec, data_dir: Path | None) -> Any:
        """The task's data (raises UserError, one line, for a bad source); has `num_labels`."""

    @abstractmethod
    def load_model(self, model: str, data: Any, data_dir: Path | None,
                   options: LoadOptions = LoadOptions()) -> tuple[nn.Module, Any]:
        """The pretrained model with a fresh head for the data, and its processor (tokenizer...),
        its weights in the dtype (and quantization) `options` ask for."""

    @abstractmethod
    def meta_model(self, model: str, data: Any, data_dir: Path | None) -> nn.Module:
        """The same model's structure on the meta device (no weights), for validation."""

    @abstractmethod
    def head_modules(self, model: nn.Module) -> tuple[str, ...]:
        """Names of the modules that form the new task head (always trained); may be empty."""

    @abstractmethod
    def build_task(self, data: Any, processor: Any, head: tuple[str, ...], spec: TaskSpec,
                   training: TrainingSpec, data_dir: Path | None) -> Task:
        """The Task for a loaded model's processor and head modules."""

    def prediction_inputs(self, spec: TaskSpec, path: Path) -> Any:
        """The rows of a local file to predict (`peftlab predict`), read and checked before any model loads."""
        raise UserError(f"predict does not support task type {self.name} yet; `peftlab eval` scores it")

    def predict(self, model: nn.Module, processor: Any, data: Any, spec: TaskSpec, training: TrainingSpec,
                inputs: Any) -> list[dict[str, Any]]:
        """One prediction per input row, as table rows."""
        raise UserError(f"predict does not support task type {self.name} yet; `peftlab eval` scores it")


@torch.no_grad()
def loss_and_predictions(model: nn.Module, batches: Iterator[dict[str, torch.Tensor]]) -> tuple[float, torch.Tensor]:
    """The mean loss over the batches' examples and each example's argmax class, in eval mode."""
    model.eval()
    total, count, predictions = 0.0, 0, []
    for batch in batches:
        out = model(**batch)
        total += out.loss.item() * len(batch["labels"])
        count += len(batch["labels"])
        predictions.append(out.logits.argmax(-1).cpu())
    model.train()
    return total / count, torch.cat(predictions)


class HeadInputs:
    """Captures what the first head module receives: the model's representation of an example.

    Found by name suffix, so it works on the bare model and on a peft-wrapped one alike.
    """

    def __init__(self, model: nn.Module, head: str) -> None:
        self.captured: list[torch.Tensor] = []
        module = next((m for name, m in model.named_modules() if name == head or name.endswith("." + head)), None)
        if module is None:
            raise ValueError(f"head module '{head}' not found")
        self.handle = module.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.captured.append(args[0].detach().flatten(1).float().cpu())

    def collect(self) -> torch.Tensor:
        self.handle.remove()
        return torch.cat(self.captured)


def representation_drift(base: torch.Tensor, tuned: torch.Tensor) -> float:
    """1 - mean cosine similarity of matching rows: 0 for identical representations."""
    cosine = torch.nn.functional.cosine_similarity(base, tuned, dim=-1)
    return float((1.0 - cosine).mean().clamp_min(0.0))


class DriftTask(Task):
    """A classification task whose retention is the drift of the representation its head reads,
    on the reference batches the subclass yields (the first `retention_samples` eval examples)."""

    head: str | None = None
    retention_samples: int = 0
    base_representation: torch.Tensor | None = None

    @abstractmethod
    def reference_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """The fixed reference examples as model inputs."""

    @torch.no_grad()
    def _representation(self, model: nn.Module, device: torch.device) -> torch.Tensor:
        was_training = model.training
        model.eval()
        hook = HeadInputs(model, self.head)
        for batch in self.reference_batches():
            model(**{k: v.to(device) for k, v in batch.items()})
        model.train(was_training)
        return hook.collect()

    def remember(self, model: nn.Module, device: torch.device) -> None:
        if self.retention_samples and self.head:
            self.base_representation = self._representation(model.to(device), device)

    def retention(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        if self.base_representation is None:
            return {}
        return {"drift": representation_drift(self.base_representation, self._representation(model, device))}
