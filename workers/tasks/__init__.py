"""Task types: how a trial turns a task spec into data, a model with its head, batches, a loss,
metrics and a retention measure. `task_kind(type)` is the only way in; the trial names no type."""
from __future__ import annotations

from .base import Task, TaskKind
from .causal_lm import CausalLmKind
from .image_classification import ImageClassificationKind
from .text_classification import TextClassificationKind

KINDS: dict[str, TaskKind] = {
    kind.name: kind for kind in (TextClassificationKind(), ImageClassificationKind(), CausalLmKind())
}


def task_kind(name: str) -> TaskKind:
    return KINDS[name]


__all__ = ["KINDS", "Task", "TaskKind", "task_kind"]
